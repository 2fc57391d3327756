"""The worker's connection loop: one ``Workers.Subscribe`` stream at a time.

This module owns everything between the engine and the actions of a registry:

* connecting (plaintext, or TLS with ``tls_ca`` / ``tls_cert`` and ``tls_key``; a
  bearer ``token`` with every stream), saying ``Hello``, reconnecting with
  exponential backoff and jitter when the stream breaks or the engine is away;
* running assignments (sync actions in a thread pool, ``async def`` ones as
  asyncio tasks), never more than ``capacity`` at once, and ignoring duplicate
  deliveries;
* turning outcomes into ``TaskResult`` / ``TaskDeferred`` and keeping every one
  of them until the engine's ``Ack`` arrives, resending them on every new stream,
  so that no outcome is lost while the worker process lives;
* heartbeats for the assignments it holds;
* a graceful stop: no new work, results delivered and acknowledged (or a grace
  period elapsed), the send side closed, every asyncio task cleaned up.

What an action is and how it is registered lives in ``levante.worker.registry``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from levante.rpc.auth import ClientCredentials
from levante.rpc.batching import take_ready
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc
from levante.worker.invoke import invoke_action
from levante.worker.registry import ActionContext, ActionRegistry

__all__ = [
    "BACKOFF_INITIAL_SECONDS",
    "BACKOFF_MAX_SECONDS",
    "GRACE_SECONDS",
    "default_worker_id",
    "serve_worker",
]

logger = logging.getLogger("levante.worker")

BACKOFF_INITIAL_SECONDS: Final = 0.1
BACKOFF_MAX_SECONDS: Final = 5.0
GRACE_SECONDS: Final = 10.0
# After closing its send side, how long the worker waits for the engine to end the stream.
CLOSE_TIMEOUT_SECONDS: Final = 2.0

# The engine refused this worker's token or certificate: worth a warning on every try.
_REFUSED: Final = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

_worker_id: tuple[int, str] | None = None


def default_worker_id() -> str:
    """``{hostname}-{pid}-{random}``, the same for every call in one process."""
    global _worker_id
    pid = os.getpid()
    if _worker_id is None or _worker_id[0] != pid:  # recomputed in a forked child
        _worker_id = (pid, f"{socket.gethostname()}-{pid}-{secrets.token_hex(3)}")
    return _worker_id[1]


async def serve_worker(
    engine: str,
    registry: ActionRegistry,
    capacity: int = 10,
    worker_id: str | None = None,
    stop: asyncio.Event | None = None,
    heartbeat_seconds: float = 10.0,
    *,
    grace_seconds: float = GRACE_SECONDS,
    targets: Sequence[str] = (),
    token: str | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    on_attached: Callable[[], None] | None = None,
) -> None:
    """Serves ``registry``'s actions to the engine at ``engine`` (``host:port``).

    ``on_attached`` is called each time an engine accepts this worker's hello (its
    actions are then in the engine's catalogue).

    ``targets``: besides untargeted work, take the tasks whose ``target:`` is one of these.
    ``token``: a bearer token of role ``worker``; ``tls_ca``: the CA that signed the
    engine's certificate (TLS is used when it or a client certificate is given);
    ``tls_cert`` and ``tls_key``: this worker's certificate, for mutual TLS.

    Runs until ``stop`` is set (then finishes gracefully: see the module
    docstring) or until the calling task is cancelled (then running actions are
    cancelled and unacknowledged outcomes are lost with the process).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, not {capacity}")
    if heartbeat_seconds <= 0:
        raise ValueError(f"heartbeat_seconds must be positive, not {heartbeat_seconds}")
    if grace_seconds < 0:
        raise ValueError(f"grace_seconds must not be negative, not {grace_seconds}")
    worker = _Worker(
        engine=engine,
        registry=registry,
        capacity=capacity,
        worker_id=worker_id or default_worker_id(),
        stop=stop if stop is not None else asyncio.Event(),
        heartbeat_seconds=heartbeat_seconds,
        grace_seconds=grace_seconds,
        targets=tuple(targets),
        credentials=ClientCredentials.from_files(token, tls_ca, tls_cert, tls_key),
        on_attached=on_attached,
    )
    await worker.run()


@dataclass(eq=False)
class _Held:
    """An accepted assignment: waiting for a slot, then running."""

    assignment: pb.TaskAssignment
    task: asyncio.Task[None] | None = None
    running: bool = False


# None on an outbox means: close the send side of the stream.
_Outbox = asyncio.Queue[pb.WorkerMessage | None]
# The engine takes messages up to 16 MiB: a bigger result could never be delivered, so
# it is reported as the task's failure instead.
MAX_RESULT_BYTES = 16 * 1024 * 1024 - 64 * 1024


class _Worker:
    def __init__(
        self,
        *,
        engine: str,
        registry: ActionRegistry,
        capacity: int,
        worker_id: str,
        stop: asyncio.Event,
        heartbeat_seconds: float,
        grace_seconds: float,
        targets: tuple[str, ...] = (),
        credentials: ClientCredentials | None = None,
        on_attached: Callable[[], None] | None = None,
    ) -> None:
        self._on_attached = on_attached
        self._targets = targets
        self._credentials = credentials or ClientCredentials()
        self._engine = engine
        self._registry = registry
        self._capacity = capacity
        self._id = worker_id
        self._stop = stop
        self._heartbeat_seconds = heartbeat_seconds
        self._grace_seconds = grace_seconds
        self._loop = asyncio.get_running_loop()
        # Accepted and not finished, in arrival order.
        self._held: dict[str, _Held] = {}
        # Outcomes sent (or to send) and not yet acknowledged, in completion order.
        self._unacked: dict[str, pb.WorkerMessage] = {}
        # The current stream's send queue; None while disconnected or closing.
        self._outbox: _Outbox | None = None
        self._slots = asyncio.Semaphore(capacity)
        self._changed = asyncio.Event()  # pulsed whenever _held or _unacked shrinks
        self._deadline: float | None = None  # end of the grace period, once stopping
        self._received = False  # the current stream delivered something
        self._executor = ThreadPoolExecutor(
            max_workers=capacity, thread_name_prefix=f"levante-action-{worker_id}"
        )

    # ------------------------------------------------------------ logging

    def _log(self, level: int, msg: str, *args: Any, task_id: str | None = None) -> None:
        if not logger.isEnabledFor(level):
            return  # per-task DEBUG lines: not even their arguments are built
        if task_id is None:
            logger.log(level, "worker %s: " + msg, self._id, *args,
                       extra={"worker_id": self._id}, stacklevel=2)
        else:
            logger.log(level, "worker %s: task %s: " + msg, self._id, task_id, *args,
                       extra={"worker_id": self._id, "task_id": task_id}, stacklevel=2)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch_stop(), name=f"levante-worker:{self._id}:stop")
        failures = 0
        try:
            while not self._finished():
                started = self._loop.time()
                self._received = False
                try:
                    await self._session()
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code() in _REFUSED  # retried: tokens may be fixed server-side
                    level = logging.WARNING if self._received or refused else logging.INFO
                    self._log(level, "stream to %s ended: %s %s",
                              self._engine, exc.code().name, exc.details())
                except Exception:
                    logger.exception("worker %s: stream to %s failed", self._id, self._engine,
                                     extra={"worker_id": self._id})
                if self._finished():
                    break
                if self._received or self._loop.time() - started >= BACKOFF_MAX_SECONDS:
                    failures = 0
                delay = _backoff(failures)
                failures += 1
                self._log(logging.INFO, "reconnecting to %s in %.2fs", self._engine, delay)
                await self._pause(delay)
        finally:
            await self._shutdown(watcher)
        self._log(logging.INFO, "stopped")

    async def _watch_stop(self) -> None:
        await self._stop.wait()
        self._begin_stop()

    def _begin_stop(self) -> None:
        """Once, when ``stop`` is seen: start the grace period, drop queued work."""
        if self._deadline is not None:
            return
        self._deadline = self._loop.time() + self._grace_seconds
        queued = [tid for tid, held in self._held.items() if not held.running]
        for tid in queued:
            held = self._held.pop(tid)
            if held.task is not None:
                held.task.cancel()
        self._log(logging.INFO, "stopping: %d running, %d unacknowledged, %d queued dropped",
                  len(self._held), len(self._unacked), len(queued))
        self._pulse()

    def _drained(self) -> bool:
        return not self._held and not self._unacked

    def _finished(self) -> bool:
        if not self._stop.is_set():
            return False
        self._begin_stop()
        assert self._deadline is not None
        return self._drained() or self._loop.time() >= self._deadline

    def _pulse(self) -> None:
        self._changed.set()

    async def _wait_changed(self, until: float | None) -> bool:
        """Waits for a pulse; False when ``until`` (loop time) passed first."""
        self._changed.clear()
        timeout = None if until is None else until - self._loop.time()
        if timeout is not None and timeout <= 0:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def _pause(self, delay: float) -> None:
        """Sleeps ``delay`` seconds, less when stopping and there is nothing left to do."""
        end = self._loop.time() + delay
        while not self._finished():
            until = end if self._deadline is None else min(end, self._deadline)
            if not await self._wait_changed(until):
                return

    async def _shutdown(self, watcher: asyncio.Task[None]) -> None:
        watcher.cancel()
        tasks: list[asyncio.Task[Any]] = [watcher]
        abandoned = [tid for tid, held in self._held.items() if held.running]
        if abandoned:
            self._log(logging.WARNING, "abandoning running tasks %s", ", ".join(abandoned))
        for held in self._held.values():
            if held.task is not None:
                held.task.cancel()
                tasks.append(held.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held.clear()
        if self._unacked:
            self._log(logging.WARNING, "outcomes never acknowledged: %s",
                      ", ".join(self._unacked))
        # Threads cannot be interrupted: the ones still running finish on their own.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ one stream

    async def _session(self) -> None:
        """One stream, from Hello until it breaks or the worker has closed it."""
        channel = self._credentials.channel(self._engine)
        call: Any = None
        outbox: _Outbox = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []
        try:
            stub: Any = pb_grpc.WorkersStub  # generated without type hints
            call = stub(channel).Subscribe(metadata=self._credentials.metadata or None)
            hello = self._hello()
            outbox.put_nowait(hello)
            for message in self._unacked.values():
                outbox.put_nowait(message)
            self._outbox = outbox
            self._log(logging.INFO, "subscribing to %s (capacity %d, holding %d, resending %d)",
                      self._engine, self._capacity, len(hello.hello.holding), len(self._unacked))
            name = f"levante-worker:{self._id}"
            reader = asyncio.create_task(self._read(call), name=f"{name}:read")
            writer = asyncio.create_task(self._write(call, outbox), name=f"{name}:write")
            tasks = [
                reader,
                writer,
                asyncio.create_task(self._heartbeat(outbox), name=f"{name}:heartbeat"),
                asyncio.create_task(self._close_when_done(outbox), name=f"{name}:close"),
            ]
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and writer.exception() is None and not reader.done():
                # The send side is closed: let the engine answer and end the stream.
                await asyncio.wait((reader,), timeout=CLOSE_TIMEOUT_SECONDS)
            for task in (reader, writer):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            self._log(logging.INFO, "stream to %s closed", self._engine)
        finally:
            if self._outbox is outbox:
                self._outbox = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _hello(self) -> pb.WorkerMessage:
        holding = list(self._held) + [tid for tid in self._unacked if tid not in self._held]
        return pb.WorkerMessage(
            hello=pb.Hello(
                worker_id=self._id,
                actions=self._registry.names(),
                capacity=self._capacity,
                holding=holding,
                targets=list(self._targets),
                accepts_batches=True,
            )
        )

    async def _read(self, call: Any) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            self._received = True
            if message.WhichOneof("kind") == "batch":
                for inner in message.batch.messages:
                    self._handle(inner)
            else:
                self._handle(message)

    def _handle(self, message: pb.EngineMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assignment":
            self._accept(message.assignment)
        elif kind == "ack":
            self._acknowledge(message.ack)
        elif kind == "cancel":
            self._cancel(message.cancel)
        elif kind == "attached":
            self._log(logging.INFO, "attached to %s", self._engine)
            if self._on_attached is not None:
                self._on_attached()
        else:
            self._log(logging.DEBUG, "ignoring engine message of kind %s", kind)

    async def _write(self, call: Any, outbox: _Outbox) -> None:
        while True:
            message = await outbox.get()
            if message is None:
                await call.done_writing()
                return
            if outbox.empty() or message.WhichOneof("kind") == "hello":
                await call.write(message)
                continue
            batch, ended = take_ready(message, outbox)  # results ready together go as one
            if len(batch) == 1:
                await call.write(message)
            else:
                await call.write(pb.WorkerMessage(batch=pb.WorkerBatch(messages=batch)))
            if ended:
                await call.done_writing()
                return

    async def _heartbeat(self, outbox: _Outbox) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            # Sent even when holding nothing: it tells the engine this worker is alive
            # (a worker whose lease ran out gets no new work until it is heard from).
            if self._outbox is outbox:
                outbox.put_nowait(
                    pb.WorkerMessage(heartbeat=pb.Heartbeat(task_ids=list(self._held)))
                )

    async def _close_when_done(self, outbox: _Outbox) -> None:
        """When stopping: close the send side once drained or when the grace ends."""
        await self._stop.wait()
        self._begin_stop()
        while not self._drained() and await self._wait_changed(self._deadline):
            pass
        if self._outbox is outbox:
            self._outbox = None
        self._log(logging.INFO, "closing the stream (%s)",
                  "drained" if self._drained() else "grace period over")
        outbox.put_nowait(None)

    # ------------------------------------------------------------ engine messages

    def _accept(self, assignment: pb.TaskAssignment) -> None:
        tid = assignment.task_id
        if not tid:
            self._log(logging.WARNING, "ignoring an assignment without task_id")
            return
        if tid in self._held or tid in self._unacked:
            self._log(logging.INFO, "ignoring duplicate assignment", task_id=tid)
            return
        if self._stop.is_set():
            self._log(logging.INFO, "stopping: not taking assignment of %s", assignment.action,
                      task_id=tid)
            return
        held = _Held(assignment)
        self._held[tid] = held
        held.task = asyncio.create_task(self._execute(held), name=f"levante-worker:task:{tid}")

    def _cancel(self, cancel: pb.AssignmentCancelled) -> None:
        """The engine no longer wants this assignment: stop its action if it runs."""
        held = self._held.get(cancel.task_id)
        self._log(logging.INFO, "assignment cancelled: %s", cancel.reason, task_id=cancel.task_id)
        if held is not None and held.task is not None:
            held.task.cancel()  # an async action stops; a sync one's thread runs on, unheard

    def _acknowledge(self, ack: pb.Ack) -> None:
        tid = ack.task_id
        if self._unacked.pop(tid, None) is None:
            self._log(logging.DEBUG, "ack (%s) for nothing unacknowledged", ack.code, task_id=tid)
            return
        code = ack.code or "OK"
        if code == "OK":
            self._log(logging.DEBUG, "acknowledged", task_id=tid)
        else:
            self._log(logging.WARNING, "engine answered %s: %s", code, ack.message, task_id=tid)
        self._pulse()

    # ------------------------------------------------------------ running actions

    async def _execute(self, held: _Held) -> None:
        assignment = held.assignment
        tid = assignment.task_id
        try:
            async with self._slots:
                held.running = True
                self._log(logging.DEBUG, "running %s (attempt %d)", assignment.action,
                          assignment.attempt, task_id=tid)
                try:
                    message = await self._outcome(assignment)
                except Exception as exc:  # a bug in the worker, not in the action
                    logger.exception("worker %s: task %s: internal error", self._id, tid,
                                     extra={"worker_id": self._id, "task_id": tid})
                    message = self._error(tid, "WorkerError", str(exc))
        finally:
            if self._held.get(tid) is held:
                del self._held[tid]
            self._pulse()
        # No await between leaving _held and entering _unacked: Hello sees one or the other.
        self._unacked[tid] = message
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    async def _outcome(self, assignment: pb.TaskAssignment) -> pb.WorkerMessage:
        """Runs one assignment; every way it can end becomes a message."""
        tid = assignment.task_id
        try:
            action_input = json.loads(assignment.input_json) if assignment.input_json else {}
        except ValueError as exc:
            return self._error(tid, "InvalidInput", f"input_json is not JSON: {exc}")
        context = ActionContext(
            task_id=tid,
            execution_id=assignment.execution_id,
            task_name=assignment.task_name,
            attempt=assignment.attempt,
        )
        invocation = await invoke_action(
            self._registry, assignment.action, action_input, context, self._executor
        )
        if invocation.deferred:
            self._log(logging.INFO, "%s deferred", assignment.action, task_id=tid)
            return pb.WorkerMessage(defer=pb.TaskDeferred(task_id=tid))
        text = json.dumps(invocation.value)
        if len(text) > MAX_RESULT_BYTES // 4 and len(text.encode()) > MAX_RESULT_BYTES:
            what = "result" if invocation.ok else "error"
            message = (f"{assignment.action} returned a {what} of {len(text.encode())} bytes; "
                       f"at most {MAX_RESULT_BYTES} fit in a message to the engine")  # fmt: skip
            self._log(logging.WARNING, "%s", message, task_id=tid)
            return self._error(tid, "ResultTooLarge", message)
        if invocation.ok:
            # Per-task success lines are DEBUG: at INFO they cost the worker more than a
            # std.noop does (failures and deferrals stay INFO).
            self._log(logging.DEBUG, "%s succeeded", assignment.action, task_id=tid)
            return pb.WorkerMessage(result=pb.TaskResult(task_id=tid, result_json=text))
        self._log(logging.INFO, "%s failed: %s", assignment.action, invocation.value, task_id=tid)
        return pb.WorkerMessage(result=pb.TaskResult(task_id=tid, error_json=text))

    def _error(self, task_id: str, kind: str, message: str) -> pb.WorkerMessage:
        error_json = json.dumps({"type": kind, "message": message})
        return pb.WorkerMessage(result=pb.TaskResult(task_id=task_id, error_json=error_json))


def _backoff(failures: int) -> float:
    """Exponential from 0.1 s, capped at 5 s, with jitter over the upper half."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** min(failures, 16))
    return random.uniform(ceiling / 2, ceiling)
