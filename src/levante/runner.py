"""The in-process runner: the synchronous engine built on the asynchronous one.

``LocalEngine`` puts the lazy Engine, a Dispatcher and an in-process worker session on
one event loop and one store (memory by default, or SQLite). Each execution is awaited
through a future that resolves when the execution ends. ``run_workflow`` wraps it all
for scripts and tests: it runs a workflow to the end and returns its result.

Nothing here adds rules: the same core decides, the same engine transactions record,
and actions run through the same dispatcher and leases that remote workers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Collection, Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from levante.client import ExecutionInfo, TaskInfo
from levante.core.model import AssignmentRecord, ExecutionRecord, Outcome, TaskRecord
from levante.dispatch import MAX_RESULTS_PER_TRANSACTION, Dispatcher, WorkerSession
from levante.engine import Completion, Engine, EngineListeners
from levante.errors import LevanteError
from levante.ids import ExecutionId
from levante.store import store_for
from levante.timers import Timekeeper
from levante.worker.invoke import Invocation, invoke_action, invoke_now
from levante.worker.registry import ActionContext, ActionRegistry
from levante.worker.std import std_actions

__all__ = ["ExecutionResult", "LocalEngine", "run_workflow"]

LOCAL_WORKER_ID = "local"


@dataclass(frozen=True)
class ExecutionResult:
    """How an execution ended: its state, output and tasks."""

    execution_id: str
    state: str
    state_info: str
    output: Any
    tasks: tuple[TaskInfo, ...]

    @property
    def ok(self) -> bool:
        return self.state == "SUCCESS"

    def task(self, name: str) -> TaskInfo:
        """The latest run of the task called ``name``."""
        matches = [t for t in self.tasks if t.name == name]
        if not matches:
            raise KeyError(name)
        return matches[-1]


def _info(execution: ExecutionRecord, tasks: list[TaskRecord]) -> ExecutionInfo:
    return ExecutionInfo(
        id=execution.id,
        workflow=execution.workflow,
        state=execution.state.value,
        state_info=execution.state_info,
        input=dict(execution.input),
        output=execution.output if execution.state.is_final else None,
        tasks=tuple(
            TaskInfo(
                id=t.id,
                name=t.name,
                state=t.state.value,
                state_info=t.state_info,
                action=t.action or "",
                published=dict(t.published),
                result=t.result,
                attempt=t.attempt,
                assignment_id=t.assignment_id or "",
            )
            for t in tasks
        ),
    )


class LocalEngine:
    """Engine, store and an in-process worker on the running event loop."""

    def __init__(
        self,
        store: str = "memory://",
        actions: ActionRegistry | Mapping[str, Callable[..., Any]] | None = None,
        *,
        concurrency: int = 64,
        targets: Collection[str] = (),
    ) -> None:
        self._targets = frozenset(targets)
        self.store = store_for(store)
        self.engine = Engine(self.store)
        self.dispatcher = Dispatcher(self.store, self.engine)
        self.engine.set_dispatch_listener(self.dispatcher.notify)
        self.timekeeper = Timekeeper(self.store, self.engine)
        self.engine.listeners.on_timer = self.timekeeper.scheduled
        self.engine.listeners.on_ended = self._ended
        self.engine.listeners.on_voided = self.dispatcher.voided
        self.registry = std_actions()
        if isinstance(actions, ActionRegistry):
            self.registry = self.registry.include(actions)
        elif actions:
            for name, fn in actions.items():
                self.registry.register(name, fn)
        self._concurrency = concurrency
        self._session: WorkerSession | None = None
        self._running: set[asyncio.Task[None]] = set()
        # Results not yet recorded, and whether a task is recording them (_report).
        self._unrecorded: list[Completion] = []
        self._recording = False
        self._waiters: dict[ExecutionId, list[asyncio.Future[object]]] = {}

    async def __aenter__(self) -> LocalEngine:
        await self.start_engine()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_engine(self) -> None:
        await self.store.open()
        await self.dispatcher.start()
        self.timekeeper.start()
        self._session = WorkerSession(
            worker_id=LOCAL_WORKER_ID,
            actions=frozenset(self.registry.names()),
            capacity=self._concurrency,
            deliver=self._deliver,
            targets=self._targets,
        )
        await self.dispatcher.attach(self._session, holding=())

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        for task in list(self._running):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self.dispatcher.detach(self._session)
        await self.timekeeper.close()
        await self.dispatcher.close()
        await self.store.close()
        # The engine's callbacks point back here (and at the dispatcher and timekeeper,
        # which point at the engine): without them nothing of this run is in a cycle, and
        # its rows are freed as soon as the caller drops the engine, not by a later
        # garbage collection that would walk them all first.
        self.engine.listeners = EngineListeners()
        self._session = None

    async def register(self, definition: str) -> list[str]:
        return await self.engine.register(definition)

    async def start(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        execution_id = await self.engine.run(workflow, input, params)
        return str(execution_id)

    async def pause(self, execution_id: str) -> None:
        await self.engine.pause(ExecutionId(execution_id))

    async def resume(self, execution_id: str) -> None:
        await self.engine.resume(ExecutionId(execution_id))

    async def cancel(self, execution_id: str, reason: str = "") -> None:
        await self.engine.cancel(ExecutionId(execution_id), reason)

    async def rerun(self, execution_id: str, task_name: str) -> None:
        await self.engine.rerun(ExecutionId(execution_id), task_name)

    async def status(self, execution_id: str) -> ExecutionInfo:
        execution, tasks = await self.engine.get_status(ExecutionId(execution_id))
        return _info(execution, tasks)

    async def wait(self, execution_id: str) -> ExecutionResult:
        """Resolve when the execution is in a final state."""
        key = ExecutionId(execution_id)
        execution = await self.store.get_execution(key)
        if execution is None or not execution.state.is_final:
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(future)
            await self._check_final(key)
            await future
        info = await self.status(execution_id)
        return ExecutionResult(info.id, info.state, info.state_info, info.output, info.tasks)

    async def run(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
    ) -> ExecutionResult:
        return await self.wait(await self.start(workflow, input, params=params))

    # -- the in-process worker

    async def _deliver(self, assignment: AssignmentRecord) -> None:
        invocation = invoke_now(
            self.registry, assignment.action, assignment.input, _context_of(assignment)
        )
        if invocation is None or invocation.deferred:  # runs in a task of its own
            self._start(self._execute(assignment, invocation))
            return
        # An immediate action has run already: its result waits for the recording task
        # that this turn's deliveries share (started by the first of them).
        completion = Completion(assignment.id, Outcome(invocation.ok, invocation.value))
        if self._queue(completion):
            self._start(self._record_queued(wait_for_others=False))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(
        self, assignment: AssignmentRecord, invocation: Invocation | None = None
    ) -> None:
        assert self._session is not None
        if invocation is None:
            invocation = await invoke_action(
                self.registry, assignment.action, assignment.input, _context_of(assignment)
            )
        if not invocation.deferred:
            completion = Completion(assignment.id, Outcome(invocation.ok, invocation.value))
            if self._queue(completion):
                # Other actions that end in this turn of the loop report too, first.
                await self._record_queued(wait_for_others=len(self._running) > 1)
            return
        with contextlib.suppress(LevanteError):  # decided already (a duplicate): nothing to do
            await self.dispatcher.defer(self._session, assignment.id)

    def _queue(self, completion: Completion) -> bool:
        """Queue a result to be recorded with the others that end in the same turn of
        the loop, as a remote worker sends the results it has in one message: a
        fan-out's branches share transactions. True when nobody is recording them yet:
        the caller must (``_record_queued``)."""
        self._unrecorded.append(completion)
        if self._recording:
            return False
        self._recording = True
        return True

    async def _record_queued(self, *, wait_for_others: bool) -> None:
        assert self._session is not None
        try:
            if wait_for_others:
                await asyncio.sleep(0)
            while True:
                batch = self._unrecorded[:MAX_RESULTS_PER_TRANSACTION]
                del self._unrecorded[:MAX_RESULTS_PER_TRANSACTION]
                # Refusals (a result decided already, a duplicate) leave nothing to do;
                # an execution these end resolves its waiters through _ended.
                await self.dispatcher.results(self._session, batch)
                if not self._unrecorded:
                    break
                # More came meanwhile (immediate actions that the recording started run
                # at once): the loop serves everything else between two transactions.
                await asyncio.sleep(0)
        finally:
            self._recording = False

    async def complete(self, task_id: str, outcome: Outcome) -> None:
        """Complete a deferred assignment from outside (as Engine.TaskComplete does); an
        execution it ends resolves its waiters through _ended."""
        await self.engine.complete(task_id, outcome)  # type: ignore[arg-type]

    def _ended(self, execution_ids: Collection[ExecutionId]) -> None:
        for execution_id in execution_ids:
            for future in self._waiters.pop(execution_id, []):
                if not future.done():
                    future.set_result(execution_id)

    async def _check_final(self, execution_id: ExecutionId) -> None:
        waiters = self._waiters.get(execution_id)
        if not waiters:
            return
        execution = await self.store.get_execution(execution_id)
        if execution is not None and execution.state.is_final:
            for future in self._waiters.pop(execution_id, []):
                if not future.done():
                    future.set_result(execution_id)


def _context_of(assignment: AssignmentRecord) -> ActionContext:
    return ActionContext(
        task_id=assignment.id,
        execution_id=assignment.execution_id,
        task_name=assignment.task_name,
        attempt=assignment.attempt,
    )


class _LoopThread:
    """An event loop in a daemon thread, for callers without one of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def run_workflow(
    definition: str,
    workflow: str | None = None,
    input: Mapping[str, Any] | None = None,
    actions: ActionRegistry | Mapping[str, Callable[..., Any]] | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    store: str = "memory://",
    timeout: float | None = None,
) -> ExecutionResult:
    """Run a workflow to the end in this process and return how it ended.

    ``definition`` is Mistral v2 YAML; ``workflow`` may be omitted when it defines
    one workflow; ``actions`` maps action names to plain or async functions (or is an
    ActionRegistry), served next to the std actions. Works whether or not the caller
    has an event loop running: called from inside one, the engine runs on a loop thread
    of its own. ``timeout`` (seconds) raises TimeoutError when the run takes longer.
    """

    async def go() -> ExecutionResult:
        async with LocalEngine(store, actions) as local:
            names = await local.register(definition)
            name = workflow
            if name is None:
                if len(names) != 1:
                    raise LevanteError(f"the definition holds {names}; name one as workflow=")
                name = names[0]
            return await local.run(name, input, params=params)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop runs in this thread: run one here (no thread to start)
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(go(), timeout))
        finally:
            # Not asyncio.run: its end waits for actions still running on threads,
            # which a timeout has given up on.
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    runner = _LoopThread()
    try:
        future: Future[ExecutionResult] = runner.submit(go())
        return future.result(timeout)
    finally:
        runner.close()
