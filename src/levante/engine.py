"""The lazy engine: lock -> load -> decide -> save -> commit -> wake.

An Engine holds no execution state between calls. Each verb is one store transaction
that loads only the rows its event touches (the execution row, the task, the joins
among its successors, the tasks named in ``task('x')`` expressions, the next held
with-items assignment), asks the pure core what follows, writes the decision back,
and carries out its commands and follow-up events (inline noop tasks, subworkflows
starting or ending, with-items settling) in the same transaction. Workers, timers
and waiters are told only after the commit. Parsed definitions are cached: they are
immutable and derived from the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from levante.core.decide import bind_input, check_params, decide
from levante.core.model import (
    MAX_TASK_READS,
    NO_OTHER_EXECUTIONS,
    AssignmentCompleted,
    AssignmentRecord,
    AssignmentState,
    BacklogResumed,
    CancelExecutionWork,
    CancelTimer,
    ChildExecutionEnded,
    Decision,
    DispatchAssignment,
    Event,
    ExecutionCancelRequested,
    ExecutionDrained,
    ExecutionPauseRequested,
    ExecutionRecord,
    ExecutionResumeRequested,
    ExecutionStarted,
    ExecutionState,
    FailTaskAssignments,
    HistoryEntry,
    ItemsSettled,
    LeaseExpired,
    OtherExecutions,
    Outcome,
    PauseAssignments,
    PropagateToChildren,
    ResumeAssignments,
    Snapshot,
    StartChildExecution,
    StartTimer,
    TaskFinished,
    TaskRecord,
    TaskRerunRequested,
    TasksNeeded,
    TaskState,
    TimerFired,
    TimerRecord,
    VoidAssignment,
)
from levante.core.running import assignment_id
from levante.core.step import task_view
from levante.errors import (
    AlreadyCompletedError,
    ConflictError,
    InvalidInputError,
    LevanteError,
    NotFoundError,
    RequestIdTakenError,
)
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId
from levante.lang import expressions
from levante.lang.parser import parse_document_cached
from levante.lang.spec import Document, WorkflowSpec
from levante.limits import (
    DEFAULT_LIMITS,
    LimitExceededError,
    Limits,
    check_definition,
    check_json_value,
    check_task_count,
)
from levante.store.base import WAITING_FOR_WORKER, Store, StoreTransaction

log = logging.getLogger("levante.engine")

# A cascade of follow-ups (inline noop tasks, subworkflows) in one transaction stops
# here, so that a cycle of action-less tasks cannot spin forever inside the store.
MAX_STEPS_PER_TRANSACTION = 10_000


@dataclass(frozen=True)
class _WorkflowIndex:
    """What the engine derives once per workflow version to load only what it needs."""

    definition_id: DefinitionId
    spec: WorkflowSpec
    referenced: frozenset[str]  # task names read by task('x') expressions
    waiting_successors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _names: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)

    def names_to_load(self, task_name: str) -> frozenset[str]:
        """The tasks whose latest rows a decision about ``task_name`` reads."""
        names = self._names.get(task_name)
        if names is None:
            names = frozenset(
                {task_name, *self.waiting_successors.get(task_name, ()), *self.referenced}
            )
            self._names[task_name] = names
        return names


# What _index derives from a parsed workflow, by the spec object (parsed documents are
# cached by text, so every engine in the process shares them): bounded, oldest out.
_DERIVED: dict[int, tuple[WorkflowSpec, frozenset[str], dict[str, tuple[str, ...]]]] = {}
_DERIVED_SIZE = 1024
_DERIVED_LOCK = threading.Lock()  # in-process runners each run an engine on a thread


def _index(definition_id: DefinitionId, spec: WorkflowSpec) -> _WorkflowIndex:
    with _DERIVED_LOCK:
        found = _DERIVED.get(id(spec))
    if found is None or found[0] is not spec:
        referenced, waiting = _derive(spec)
        with _DERIVED_LOCK:
            if len(_DERIVED) >= _DERIVED_SIZE:
                del _DERIVED[next(iter(_DERIVED))]
            found = _DERIVED[id(spec)] = (spec, referenced, waiting)
    return _WorkflowIndex(definition_id, spec, found[1], found[2])


def _derive(spec: WorkflowSpec) -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
    """The task names expressions read with task('x') (every task when one is dynamic),
    and each task's successors that wait for it (joins; reverse: dependents)."""
    referenced: set[str] = set()
    dynamic = False
    values: list[Any] = [spec.output, spec.output_on_error]
    for task in spec.tasks.values():
        policies = task.policies
        values += [task.action, task.workflow, dict(task.input), task.input_expression,
                   dict(task.publish), dict(task.publish_on_error), task.keep_result,
                   policies.retry and vars(policies.retry), policies.fail_on, policies.timeout,
                   policies.wait_before, policies.wait_after, policies.pause_before,
                   policies.concurrency, task.target,
                   task.with_items and [v for _, v in task.with_items.variables]]
        for clause in task.clauses():
            values += [dict(clause.publish), dict(clause.publish_global)]
            values.extend((t.condition, dict(t.params)) for t in clause.transitions)
    for value in values:
        names = expressions.referenced_task_names(value)
        if names is None:
            dynamic = True
        else:
            referenced |= names
    if dynamic:
        referenced = set(spec.tasks)
    waiting: dict[str, tuple[str, ...]] = {}
    for name, task in spec.tasks.items():
        if spec.type == "reverse":
            waiting[name] = spec.dependent_task_names(name)
        else:
            waiting[name] = tuple(n for n in task.next_task_names() if spec.task(n).join)
    return frozenset(referenced & set(spec.tasks)), waiting


#: Documents longer than this (characters) are parsed on a worker thread, and
#: workflows with more tasks than INLINE_INDEX_TASKS indexed there: parsing a
#: 10,000-task document takes seconds, and the event loop must go on serving meanwhile.
INLINE_PARSE_CHARS = 32 * 1024
INLINE_INDEX_TASKS = 500

T = TypeVar("T")


async def _off_the_loop(large: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: on a worker thread when the input is ``large``, else inline (a
    thread hop costs more than a small document's work)."""
    if not large:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def _checked_document(text: str, limits: Limits) -> Document:
    check_definition(text, limits)
    return parse_document_cached(text)


@dataclass
class _Effects:
    """What to tell the world once the transaction has committed."""

    announced: set[str] = field(default_factory=set)  # actions announced to other engines
    # Assignments queued by this transaction and not claimed in it, by action: workers
    # are woken only for these.
    queued: dict[AssignmentId, str] = field(default_factory=dict)
    resumed: set[str] = field(default_factory=set)
    earliest_timer: float | None = None
    ended: set[ExecutionId] = field(default_factory=set)
    changed: set[ExecutionId] = field(default_factory=set)
    voided: dict[str, str] = field(default_factory=dict)  # assignment id prefix -> reason

    def timer(self, due: float) -> None:
        self.earliest_timer = due if self.earliest_timer is None else min(self.earliest_timer, due)


@dataclass
class EngineListeners:
    """Called after commits: queued work, a new timer, executions that ended."""

    on_dispatch: Callable[[Collection[str]], None] | None = None
    on_timer: Callable[[float], None] | None = None
    on_ended: Callable[[Collection[ExecutionId]], None] | None = None
    on_changed: Callable[[Collection[ExecutionId]], None] | None = None
    on_voided: Callable[[Collection[str], str], None] | None = None


class Engine:
    """The two verbs (run, complete), timers firing, registration and reads, over one Store."""

    def __init__(
        self,
        store: Store,
        *,
        on_dispatch: Callable[[Collection[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
        new_execution_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.store = store
        self.limits = limits
        self.listeners = EngineListeners(on_dispatch=on_dispatch)
        self._clock = clock
        self._new_execution_id = new_execution_id
        self._documents: dict[DefinitionId, Document] = {}
        self._actions_online: dict[str, float] = {}  # see _action_online_until
        self._indexes: dict[tuple[DefinitionId, str], _WorkflowIndex] = {}

    def set_dispatch_listener(self, listener: Callable[[Collection[str]], None]) -> None:
        self.listeners.on_dispatch = listener

    # -- definitions

    async def register(self, text: str) -> list[str]:
        """Parse, validate and store a document; returns the workflow names it defines."""
        large = len(text) > INLINE_PARSE_CHARS
        document = await _off_the_loop(large, _checked_document, text, self.limits)
        for workflow in document.workflows.values():
            check_task_count(workflow.name, len(workflow.tasks), self.limits, workflow.line)
        names = list(document.workflows)
        definition_id = await self.store.save_definition(text, names, self._clock())
        self._documents[definition_id] = document
        return names

    async def _workflow(self, definition_id: DefinitionId, name: str) -> _WorkflowIndex:
        key = (definition_id, name)
        index = self._indexes.get(key)
        if index is not None:
            return index
        document = self._documents.get(definition_id)
        if document is None:
            stored = await self.store.get_definition(definition_id)
            if stored is None:
                raise NotFoundError(f"workflow definition {definition_id} not found")
            large = len(stored.text) > INLINE_PARSE_CHARS
            document = await _off_the_loop(large, parse_document_cached, stored.text)
            self._documents[definition_id] = document
        spec = document.workflows.get(name)
        if spec is None:
            raise NotFoundError(f"workflow '{name}' not found in definition {definition_id}")
        large = len(spec.tasks) > INLINE_INDEX_TASKS
        index = await _off_the_loop(large, _index, definition_id, spec)
        spec = dataclasses.replace(spec, max_with_items=self.limits.with_items)
        index = self._indexes[key] = dataclasses.replace(index, spec=spec)
        return index

    async def definition_text(self, definition_id: DefinitionId) -> str:
        """The registered document (YAML) with this id."""
        stored = await self.store.get_definition(definition_id)
        if stored is None:
            raise NotFoundError(f"workflow definition {definition_id} not found")
        return stored.text

    async def find_workflow(self, name: str) -> _WorkflowIndex:
        stored = await self.store.find_workflow(name)
        if stored is None:
            raise NotFoundError(f"workflow '{name}' not found")
        return await self._workflow(stored.id, name)

    # -- Run

    async def run(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        definition: str | None = None,
    ) -> ExecutionId:
        """Start an execution and queue its first tasks, in one transaction."""
        check_json_value(dict(input or {}), "input_json", "input_bytes", self.limits)
        check_json_value(dict(params or {}), "params_json", "input_bytes", self.limits)
        if definition:
            await self.register(definition)
        if not workflow:
            raise InvalidInputError("workflow: a workflow name is required")
        index = await self.find_workflow(workflow)
        params = dict(params or {})
        check_params(index.spec, params)
        bound = bind_input(index.spec, dict(input or {}))
        effects = _Effects()
        try:
            async with self.store.transaction() as tx:
                if request_id:
                    existing = await tx.find_execution_by_request_id(request_id)
                    if existing is not None:
                        return existing
                event = ExecutionStarted(
                    execution_id=ExecutionId(self._new_execution_id()),
                    workflow=workflow,
                    definition_id=index.definition_id,
                    input=bound,
                    params=params,
                    request_id=request_id or None,
                    now=self._clock(),
                )
                decision = await self._decide(tx, index.spec, None, event)
                await tx.insert_execution(decision.execution)
                await self._apply(tx, decision, effects)
        except RequestIdTakenError:
            assert request_id
            async with self.store.transaction() as tx:  # another replica won the race
                existing = await tx.find_execution_by_request_id(request_id)
            if existing is None:
                raise
            return existing
        self._notify(effects)
        return event.execution_id

    # -- TaskComplete

    async def complete(
        self,
        assignment_id: AssignmentId,
        outcome: Outcome,
        *,
        worker_id: str | None = None,
        and_then: Callable[[StoreTransaction], Awaitable[Collection[str]]] | None = None,
    ) -> None:
        """Record one assignment's outcome and queue what became ready, in one transaction.

        The same outcome twice is accepted once; a different outcome for an assignment
        already completed raises AlreadyCompletedError. An outcome over the limits raises
        LimitExceededError; but from ``worker_id`` (a worker reporting on its stream,
        which cannot send a smaller one) it is recorded as the task's failure instead,
        and it is refused (ConflictError) if another worker holds the assignment.
        ``and_then`` runs in the same transaction after the decision is written; it
        returns the ids of the assignments it claimed (no worker is woken for those).
        """
        refused = await self.complete_many(
            [Completion(assignment_id, outcome)], worker_id=worker_id, and_then=and_then
        )
        if refused[0] is not None:
            raise refused[0]

    async def complete_many(
        self,
        completions: Sequence[Completion],
        *,
        worker_id: str | None = None,
        and_then: Callable[[StoreTransaction], Awaitable[Collection[str]]] | None = None,
    ) -> list[LevanteError | None]:
        """``complete`` of several outcomes in one transaction: what a worker reports
        together costs one commit and a few statements, not a transaction each.

        Returns, per completion in order, None (recorded, or the same outcome again) or
        the error it was refused with; one refusal does not hold back the others. When a
        decision fails part-way (its writes may be half sent), the transaction is rolled
        back and each completion is recorded again in a transaction of its own, so that
        only the one at fault is refused.
        """
        refused: list[LevanteError | None] = [None] * len(completions)
        todo: list[tuple[int, Completion]] = []
        for i, completion in enumerate(completions):
            outcome = completion.outcome
            field = "result_json" if outcome.ok else "error_json"
            try:
                check_json_value(outcome.value, field, "result_bytes", self.limits)
            except LimitExceededError as e:
                if worker_id is None:
                    refused[i] = e
                    continue
                failure = Outcome.failure({"type": "LimitExceeded", "message": str(e)})
                completion = Completion(completion.assignment_id, failure)
            todo.append((i, completion))
        if not todo:
            return refused
        effects = _Effects()
        try:
            async with self.store.transaction() as tx:
                await self._record_outcomes(tx, todo, refused, worker_id, effects)
                if and_then is not None:  # the dispatcher claims the worker's next work here
                    for claimed in await and_then(tx):
                        effects.queued.pop(AssignmentId(claimed), None)  # nobody to wake for it
        except LevanteError as e:
            if len(todo) == 1:
                refused[todo[0][0]] = e
                return refused
            for i, completion in todo:  # one at a time, each in a transaction of its own
                refused[i] = (await self.complete_many([completion], worker_id=worker_id))[0]
            return refused
        self._notify(effects)
        return refused

    async def _record_outcomes(
        self,
        tx: StoreTransaction,
        todo: list[tuple[int, Completion]],
        refused: list[LevanteError | None],
        worker_id: str | None,
        effects: _Effects,
    ) -> None:
        """Decide each completion in ``tx``, in rounds. A round reads what all its
        completions need with a few statements, then decides them one by one, each
        against those rows overlaid with what the decisions before it wrote (_Written),
        so that several results of one execution need no reads between them. A
        completion whose execution the store itself changed meanwhile (bulk updates of
        its assignments: cancel, pause, resume, a timeout) waits for the next round,
        which reads afresh."""
        pending = todo
        while pending:
            round_, pending = pending, []
            found = await tx.get_assignments({c.assignment_id for _, c in round_})
            executions = await tx.lock_executions({a.execution_id for a in found.values()})
            names: dict[ExecutionId, set[str]] = {}
            indexes: dict[ExecutionId, _WorkflowIndex] = {}
            for _, completion in round_:
                assignment = found.get(completion.assignment_id)
                execution = None if assignment is None else executions.get(assignment.execution_id)
                if assignment is None or execution is None:
                    continue
                index = indexes.get(execution.id)
                if index is None:
                    index = indexes[execution.id] = await self._workflow(
                        execution.definition_id, execution.workflow
                    )
                names.setdefault(execution.id, set()).update(
                    index.names_to_load(assignment.task_name)
                )
            tasks, latest = await tx.tasks_and_latest(
                {a.task_id for a in found.values() if a.execution_id in names}, names
            )
            written = _Written()
            for i, completion in round_:
                read = found.get(completion.assignment_id)
                if read is None or read.execution_id not in executions:
                    refused[i] = NotFoundError(f"task_id '{completion.assignment_id}' not found")
                    continue
                execution_id = read.execution_id
                if execution_id in written.disturbed:
                    pending.append((i, completion))  # read again in the next round
                    continue
                assignment = written.assignments.get(read.id, read)
                execution = written.executions.get(execution_id, executions[execution_id])
                refusal = _refusal(assignment, execution, completion.outcome, worker_id)
                if refusal is _ALREADY_RECORDED:
                    continue
                if refusal is not None:
                    refused[i] = refusal
                    continue
                task = written.tasks.get(assignment.task_id) or tasks.get(assignment.task_id)
                if task is None:
                    raise NotFoundError(f"task '{assignment.task_id}' not found")
                index = indexes[execution_id]
                newest = written.latest(
                    execution_id, index.names_to_load(task.name), latest[execution_id]
                )
                held = await self._next_held(tx, task)
                snapshot = Snapshot(execution, newest, task, assignment, held)
                event = AssignmentCompleted(assignment.id, assignment.task_id,
                                            completion.outcome, self._clock())  # fmt: skip
                decision = await self._decide(tx, index.spec, snapshot, event)
                await self._apply(tx, decision, effects, written)

    # -- lifecycle

    async def pause(self, execution_id: ExecutionId) -> None:
        await self._lifecycle(execution_id, "pause", (ExecutionState.RUNNING,))

    async def resume(self, execution_id: ExecutionId) -> None:
        await self._lifecycle(execution_id, "resume", (ExecutionState.PAUSED,))

    async def cancel(self, execution_id: ExecutionId, reason: str = "") -> None:
        await self._lifecycle(
            execution_id, "cancel", (ExecutionState.RUNNING, ExecutionState.PAUSED),
            reason or "Cancelled by an operator",
        )  # fmt: skip

    async def rerun(self, execution_id: ExecutionId, task_name: str) -> None:
        """Run a failed task of a failed execution again and carry the execution on."""
        effects = _Effects()
        async with self.store.transaction() as tx:
            execution = await tx.lock_execution(execution_id)
            if execution is None:
                raise NotFoundError(f"execution '{execution_id}' not found")
            index = await self._workflow(execution.definition_id, execution.workflow)
            if task_name not in index.spec.tasks:
                raise NotFoundError(
                    f"task '{task_name}' not found in workflow {execution.workflow}"
                )
            if execution.state != ExecutionState.ERROR:
                raise ConflictError(
                    f"execution {execution_id} is {execution.state.value}: only an execution "
                    "in ERROR can rerun a task"
                )
            latest = await tx.latest_tasks(execution.id, index.names_to_load(task_name))
            task = latest.get(task_name)
            if task is None or task.state != TaskState.ERROR:
                state = "never ran" if task is None else f"is {task.state.value}"
                raise ConflictError(f"task '{task_name}' {state}: only a task in ERROR reruns")
            snapshot = Snapshot(execution, latest, task)
            event = TaskRerunRequested(execution.id, task_name, self._clock())
            await self._apply(tx, await self._decide(tx, index.spec, snapshot, event), effects)
        self._notify(effects)

    async def _lifecycle(
        self, execution_id: ExecutionId, verb: str, allowed: tuple[ExecutionState, ...],
        reason: str = "",
    ) -> None:  # fmt: skip
        effects = _Effects()
        async with self.store.transaction() as tx:
            execution = await tx.lock_execution(execution_id)
            if execution is None:
                raise NotFoundError(f"execution '{execution_id}' not found")
            if execution.state not in allowed:
                raise ConflictError(
                    f"cannot {verb} execution {execution_id}: it is {execution.state.value}"
                )
            event = _lifecycle_event(verb, execution.id, reason, self._clock())
            index, snapshot = await self._execution_snapshot(tx, {execution.id: execution}, event)
            await self._apply(tx, await self._decide(tx, index.spec, snapshot, event), effects)
        self._notify(effects)

    async def _execution_snapshot(
        self, tx: StoreTransaction, executions: dict[ExecutionId, ExecutionRecord], event: Event,
    ) -> tuple[_WorkflowIndex, Snapshot]:  # fmt: skip
        assert isinstance(event, ExecutionPauseRequested | ExecutionResumeRequested
                          | ExecutionCancelRequested)  # fmt: skip
        execution = await self._execution(tx, executions, event.execution_id)
        index = await self._workflow(execution.definition_id, execution.workflow)
        unfinished: tuple[TaskRecord, ...] = ()
        if isinstance(event, ExecutionCancelRequested):
            unfinished = tuple(await tx.unfinished_tasks(execution.id))
        return index, Snapshot(execution, unfinished=unfinished)

    async def expire_lease(self, assignment_id: AssignmentId) -> None:
        """A lease ran out: supersede the attempt with a new one, in one transaction."""
        effects = _Effects()
        async with self.store.transaction() as tx:
            found = await tx.get_assignment(assignment_id)
            if found is None:
                return
            execution = await tx.lock_execution(found.execution_id)
            assignment = await tx.get_assignment(assignment_id)
            now = self._clock()
            if (
                execution is None or assignment is None
                or assignment.state != AssignmentState.LEASED
                or assignment.lease_expires_at is None or assignment.lease_expires_at > now
            ):  # fmt: skip
                return  # a heartbeat, a result or another replica came first
            index, snapshot = await self._snapshot_for_task(
                tx, {execution.id: execution}, assignment.task_id, assignment
            )
            event = LeaseExpired(assignment.id, now)
            decision = await self._decide(tx, index.spec, snapshot, event)
            await self._apply(tx, decision, effects)
        self._notify(effects)

    # -- timers

    async def fire_timer(self, timer: TimerRecord) -> bool:
        """Fire one due timer in its own transaction; False if another engine took it."""
        effects = _Effects()
        async with self.store.transaction() as tx:
            taken = await tx.take_timer(timer.id)
            if taken is None:
                return False
            execution = await tx.lock_execution(taken.execution_id)
            if execution is None or execution.state.is_final or taken.task_id is None:
                return True
            previous = taken.payload.get("assignment_id")
            assignment = None if previous is None else await tx.get_assignment(previous)
            index, snapshot = await self._snapshot_for_task(
                tx, {execution.id: execution}, taken.task_id, assignment
            )
            fired = TimerFired(taken, self._clock())
            decision = await self._decide(tx, index.spec, snapshot, fired)
            await self._apply(tx, decision, effects)
        self._notify(effects)
        return True

    # -- reads

    async def get_status(
        self, execution_id: ExecutionId
    ) -> tuple[ExecutionRecord, list[TaskRecord]]:
        execution = await self.get_execution(execution_id)
        return execution, await self.store.list_tasks(execution_id)

    async def get_execution(self, execution_id: ExecutionId) -> ExecutionRecord:
        """The execution's row alone: one read, whatever the number of its tasks."""
        execution = await self.store.get_execution(execution_id)
        if execution is None:
            raise NotFoundError(f"execution '{execution_id}' not found")
        return execution

    async def list_executions(
        self, *, state: str | None = None, workflow: str | None = None, limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[ExecutionRecord]:  # fmt: skip
        return await self.store.list_executions(
            state=state, workflow=workflow, limit=limit, before=before
        )

    async def history(self, execution_id: ExecutionId, after_seq: int = 0) -> list[HistoryEntry]:
        if after_seq == 0 and await self.store.get_execution(execution_id) is None:
            raise NotFoundError(f"execution '{execution_id}' not found")
        return await self.store.history(execution_id, after_seq)

    # -- loading what an event touches

    async def _execution(
        self, tx: StoreTransaction, executions: dict[ExecutionId, ExecutionRecord],
        execution_id: ExecutionId,
    ) -> ExecutionRecord:  # fmt: skip
        execution = executions.get(execution_id)
        if execution is None:
            execution = await tx.lock_execution(execution_id)
            if execution is None:
                raise NotFoundError(f"execution '{execution_id}' not found")
            executions[execution_id] = execution
        return execution

    async def _snapshot_for_task(
        self,
        tx: StoreTransaction,
        executions: dict[ExecutionId, ExecutionRecord],
        task_id: TaskId,
        assignment: AssignmentRecord | None,
        all_assignments: bool = False,
    ) -> tuple[_WorkflowIndex, Snapshot]:
        task = await tx.get_task(task_id)
        if task is None:
            raise NotFoundError(f"task '{task_id}' not found")
        execution = await self._execution(tx, executions, task.execution_id)
        index = await self._workflow(execution.definition_id, execution.workflow)
        latest = await tx.latest_tasks(execution.id, index.names_to_load(task.name))
        if all_assignments:
            assignments = tuple(await tx.task_assignments(task.id))
        else:
            assignments = await self._next_held(tx, task)
        return index, Snapshot(execution, latest, task, assignment, assignments)

    @staticmethod
    async def _next_held(tx: StoreTransaction, task: TaskRecord) -> tuple[AssignmentRecord, ...]:
        """The next with-items assignment held back by concurrency, if there is one."""
        items, started = task.runtime.get("items"), task.runtime.get("started")
        if not isinstance(items, int) or not isinstance(started, int) or started >= items:
            return ()
        held = await tx.get_assignment(assignment_id(task, started, max(task.attempt, 1)))
        return () if held is None or held.state != AssignmentState.HELD else (held,)

    async def _load(
        self, tx: StoreTransaction, executions: dict[ExecutionId, ExecutionRecord], event: Event
    ) -> tuple[_WorkflowIndex, Snapshot]:
        match event:
            case TaskFinished(task_id=task_id):
                return await self._snapshot_for_task(tx, executions, task_id, None)
            case ItemsSettled(task_id=task_id):
                return await self._snapshot_for_task(tx, executions, task_id, None, True)
            case ChildExecutionEnded(parent_task_id=parent, child_execution_id=child):
                handle = await tx.get_assignment(AssignmentId(child))
                return await self._snapshot_for_task(tx, executions, parent, handle)
            case BacklogResumed(entry=entry):
                return await self._snapshot_for_task(
                    tx, executions, TaskId(str(entry["task_id"])), None
                )
            case (
                ExecutionPauseRequested() | ExecutionResumeRequested() | ExecutionCancelRequested()
            ):
                return await self._execution_snapshot(tx, executions, event)
            case AssignmentCompleted(assignment_id=completed, task_id=task_id):
                handle = await tx.get_assignment(completed)
                return await self._snapshot_for_task(tx, executions, task_id, handle)
            case ExecutionDrained(execution_id=execution_id):
                execution = await self._execution(tx, executions, execution_id)
                index = await self._workflow(execution.definition_id, execution.workflow)
                waiting = await tx.waiting_tasks(execution.id)
                return index, Snapshot(execution, {t.name: t for t in waiting})
            case _:
                raise AssertionError(f"not a follow-up event: {event!r}")

    async def _decide(
        self, tx: StoreTransaction, spec: WorkflowSpec, snapshot: Snapshot | None, event: Event
    ) -> Decision:
        """decide(), reading the other executions' tasks its expressions ask for."""
        others = NO_OTHER_EXECUTIONS
        while True:
            try:
                return decide(spec, snapshot, event, others)
            except TasksNeeded as needed:
                others = await self._read_other_tasks(tx, others, needed)

    async def _read_other_tasks(
        self, tx: StoreTransaction, others: OtherExecutions, needed: TasksNeeded
    ) -> OtherExecutions:
        """``others`` with the tasks of ``needed.execution_id`` (and, when recursive, of
        every execution below it) read, without locks: expressions only look."""
        if len(others.read) >= MAX_TASK_READS:
            return dataclasses.replace(others, closed=True)
        tasks = dict(others.tasks)
        subworkflows = dict(others.subworkflows)
        pending = [needed.execution_id]
        while pending:
            execution_id = pending.pop()
            execution = await tx.read_execution(execution_id)
            if execution is None:
                continue  # Mistral: no such execution has no tasks
            spec = (await self._workflow(execution.definition_id, execution.workflow)).spec
            records = await tx.execution_tasks(execution_id)
            tasks[execution_id] = tuple(task_view(t, spec) for t in records)
            if not needed.recursive:
                continue
            for task in records:
                if task.name in spec.tasks and spec.task(task.name).workflow is not None:
                    children = []
                    for handle in await tx.task_assignments(task.id):
                        child = await tx.read_execution(ExecutionId(handle.id))
                        if child is not None:
                            children.append((child.id, child.state.value))
                    subworkflows[task.id] = tuple(children)
                    pending.extend(child_id for child_id, _ in children)
        read = others.read | {(needed.execution_id, needed.recursive)}
        return OtherExecutions(tasks, subworkflows, read)

    # -- carrying out a decision

    async def _apply(
        self, tx: StoreTransaction, first: Decision, effects: _Effects,
        written: _Written | None = None,
    ) -> None:  # fmt: skip
        """Write a decision, carry out its commands, decide its follow-ups: all in ``tx``.
        What the decisions write is also noted in ``written``."""
        written = _Written() if written is None else written
        executions: dict[ExecutionId, ExecutionRecord] = {}
        # Follow-ups are decided one at a time, each after the previous decision is
        # written, so every snapshot sees what came before it in this transaction.
        pending: deque[Decision | Event] = deque([first])
        steps = 0
        while pending:
            item = pending.popleft()
            if isinstance(item, Decision):
                decision = item
            else:
                steps += 1
                if steps > MAX_STEPS_PER_TRANSACTION:
                    raise ConflictError(
                        f"more than {MAX_STEPS_PER_TRANSACTION} inline steps in one "
                        "transaction (a cycle of tasks without actions?)"
                    )
                index, snapshot = await self._load(tx, executions, item)
                decision = await self._decide(tx, index.spec, snapshot, item)
            execution = decision.execution
            executions[execution.id] = execution
            written.note(decision)
            await tx.save_tasks(decision.tasks)
            await tx.save_assignments(decision.assignments)
            await tx.update_execution(execution)
            await tx.append_history(decision.history)
            if decision.history:
                effects.changed.add(execution.id)
            if execution.state.is_final:
                effects.ended.add(execution.id)
            followups: list[Event] = list(decision.followups)
            for command in decision.commands:
                match command:
                    case DispatchAssignment(assignment=a):
                        online_until = await self._action_online_until(tx, a.action)
                        if online_until is None:
                            followups.append(_unknown_action(a, self._clock()))
                            continue
                        if online_until <= self._clock():
                            noted = await _note_waiting_for_worker(tx, decision, a)
                            if noted is not None:
                                written.tasks[noted.id] = noted
                        effects.queued[a.id] = a.action
                        if a.action not in effects.announced:
                            effects.announced.add(a.action)
                            await tx.announce([a.action])
                    case VoidAssignment(assignment_id=void_id, reason=reason):
                        effects.voided[void_id] = reason
                    case FailTaskAssignments(task_id=task_id, error=error):
                        await tx.fail_task_assignments(task_id, error)
                        written.disturbed.add(execution.id)
                        effects.voided[task_id] = "the task timed out"
                    case StartTimer(timer=timer):
                        await tx.save_timers([timer])
                        effects.timer(timer.due_at)
                    case CancelTimer(timer_id=timer_id):
                        await tx.delete_timers([timer_id])
                    case PauseAssignments(execution_id=execution_id):
                        await tx.pause_assignments(execution_id)
                        written.disturbed.add(execution_id)
                    case ResumeAssignments(execution_id=execution_id):
                        await tx.resume_assignments(execution_id)
                        written.disturbed.add(execution_id)
                        resumed = await tx.queued_actions(execution_id)
                        effects.announced |= resumed
                        effects.resumed |= resumed
                        await tx.announce(resumed)
                    case CancelExecutionWork(execution_id=execution_id):
                        await tx.cancel_execution_work(execution_id)
                        written.disturbed.add(execution_id)
                        effects.voided[execution_id] = "the execution was cancelled"
                    case PropagateToChildren(execution_id=execution_id, event=verb):
                        for child in await tx.child_execution_ids(execution_id):
                            followups.append(_lifecycle_event(
                                verb, child, "Cancelled with its parent execution", self._clock()
                            ))  # fmt: skip
                    case StartChildExecution():
                        started = await self._start_child(tx, execution, command)
                        if isinstance(started, Decision):
                            await tx.insert_execution(started.execution)
                            pending.append(started)
                        else:
                            followups.append(started)
            pending.extend(followups)

    async def _action_online_until(self, tx: StoreTransaction, action: str) -> float | None:
        """None when no worker ever declared ``action``; else until when one is known to
        be connected. Read from the store's catalogue, cached while it says online."""
        cached = self._actions_online.get(action)
        if cached is not None and cached > self._clock():
            return cached
        found = (await tx.action_catalogue([action])).get(action)
        if found is not None:
            self._actions_online[action] = found
        elif action.startswith(STANDARD_ACTION_PREFIX):
            return 0.0  # the standard actions are known before any worker declares them
        return found

    async def _start_child(
        self, tx: StoreTransaction, parent: ExecutionRecord, command: StartChildExecution
    ) -> Decision | ChildExecutionEnded:
        """The first decision of a subworkflow, or its failure to start as an event."""
        parent_index = await self._workflow(parent.definition_id, parent.workflow)
        workbook = parent_index.spec.workbook
        names = [f"{workbook}.{command.workflow}"] if workbook else []
        names.append(command.workflow)
        try:
            for name in names:
                stored = await self.store.find_workflow(name)
                if stored is not None:
                    index = await self._workflow(stored.id, name)
                    break
            else:
                raise NotFoundError(f"workflow '{command.workflow}' not found")
            child_input, params = _split_child_input(index.spec, command)
            check_params(index.spec, params)
            bound = bind_input(index.spec, child_input)
        except LevanteError as e:
            return ChildExecutionEnded(
                command.parent_task_id, command.execution_id, command.item,
                Outcome.failure({"result": str(e)}), self._clock(),
            )  # fmt: skip
        event = ExecutionStarted(
            execution_id=command.execution_id, workflow=index.spec.name,
            definition_id=index.definition_id, input=bound, params=params,
            request_id=None, now=self._clock(), parent_task_id=command.parent_task_id,
            item=command.item,
        )  # fmt: skip
        return await self._decide(tx, index.spec, None, event)

    def _notify(self, effects: _Effects) -> None:
        listeners = self.listeners
        waiting = effects.resumed | set(effects.queued.values())
        if waiting and listeners.on_dispatch is not None:
            listeners.on_dispatch(waiting)
        if effects.earliest_timer is not None and listeners.on_timer is not None:
            listeners.on_timer(effects.earliest_timer)
        if effects.ended and listeners.on_ended is not None:
            listeners.on_ended(effects.ended)
        if effects.changed and listeners.on_changed is not None:
            listeners.on_changed(effects.changed)
        if effects.voided and listeners.on_voided is not None:
            for prefix, reason in effects.voided.items():
                listeners.on_voided([prefix], reason)


@dataclass
class _Written:
    """The rows a transaction's decisions have written so far, newest version of each:
    a completion decided after them sees these instead of the rows read before them.
    ``disturbed``: executions whose assignments the store changed itself (bulk updates
    these records do not show), to be read again."""

    executions: dict[ExecutionId, ExecutionRecord] = field(default_factory=dict)
    tasks: dict[TaskId, TaskRecord] = field(default_factory=dict)
    assignments: dict[AssignmentId, AssignmentRecord] = field(default_factory=dict)
    disturbed: set[ExecutionId] = field(default_factory=set)
    # The newest task written under each (execution, task name): its id.
    _newest: dict[tuple[ExecutionId, str], TaskId] = field(default_factory=dict)

    def note(self, decision: Decision) -> None:
        self.executions[decision.execution.id] = decision.execution
        for task in decision.tasks:
            self.tasks[task.id] = task
            key = (task.execution_id, task.name)
            newest = self._newest.get(key)
            if newest is None or self.tasks[newest].seq <= task.seq:
                self._newest[key] = task.id
        for assignment in decision.assignments:
            self.assignments[assignment.id] = assignment

    def latest(
        self, execution_id: ExecutionId, names: Collection[str], read: Mapping[str, TaskRecord]
    ) -> dict[str, TaskRecord]:
        """``latest_tasks`` of ``names``: the rows read, overlaid with those written."""
        found: dict[str, TaskRecord] = {}
        for name in names:
            task = read.get(name)
            newest = self._newest.get((execution_id, name))
            if newest is not None:
                written = self.tasks[newest]  # its newest version (a noted task too)
                if task is None or task.seq <= written.seq:
                    task = written
            if task is not None:
                found[name] = task
        return found


@dataclass(frozen=True)
class Completion:
    """One assignment's outcome, as a worker or TaskComplete reports it."""

    assignment_id: AssignmentId
    outcome: Outcome


# _refusal's answer for the same outcome reported again: accepted, nothing to do.
_ALREADY_RECORDED = LevanteError("already recorded")


def _refusal(
    assignment: AssignmentRecord, execution: ExecutionRecord, outcome: Outcome,
    worker_id: str | None,
) -> LevanteError | None:  # fmt: skip
    """Why this outcome cannot be recorded for this assignment (None: it can)."""
    if (
        worker_id is not None and assignment.worker_id not in (None, worker_id)
        and assignment.state in (AssignmentState.LEASED, AssignmentState.DEFERRED)
    ):  # fmt: skip
        return ConflictError(
            f"task_id '{assignment.id}' is held by another worker, not {worker_id}"
        )
    if assignment.state == AssignmentState.DONE:
        if assignment.outcome == outcome:
            return _ALREADY_RECORDED
        return AlreadyCompletedError(
            f"task_id '{assignment.id}' already completed with a different outcome"
        )
    if assignment.state == AssignmentState.CANCELLED:
        return ConflictError(
            f"task_id '{assignment.id}' was cancelled (its task ended or execution "
            f"{execution.id} is {execution.state.value})"
        )
    if assignment.state == AssignmentState.CHILD:
        return ConflictError(
            f"task_id '{assignment.id}' is carried out by subworkflow execution "
            f"{assignment.id}; it completes when that execution ends"
        )
    return None


# Every bundled worker serves the standard actions, as Mistral always knows them: a
# std.* task waits for a worker (it never fails as unknown) even on a fresh store.
STANDARD_ACTION_PREFIX = "std."


def _unknown_action(assignment: AssignmentRecord, now: float) -> AssignmentCompleted:
    """An action no worker has ever declared fails its task at once, as in Mistral."""
    error = {
        "type": "ActionNotFound",
        "message": f"Failed to find action [action_name={assignment.action}]: no worker "
        "has ever declared it",
    }
    return AssignmentCompleted(assignment.id, assignment.task_id, Outcome.failure(error), now)


async def _note_waiting_for_worker(
    tx: StoreTransaction, decision: Decision, assignment: AssignmentRecord
) -> TaskRecord | None:
    """The action is known but no worker serving it is connected: the task says so until
    a worker serving it attaches (Store.clear_waiting_notes). Returns the task noted."""
    for task in decision.tasks:
        if task.id == assignment.task_id and task.state == TaskState.RUNNING:
            note = f"{WAITING_FOR_WORKER} '{assignment.action}': none is connected"
            noted = dataclasses.replace(task, state_info=note)
            await tx.note_waiting(noted, assignment.action)
            return noted
    return None


def _lifecycle_event(
    verb: str, execution_id: ExecutionId, reason: str, now: float
) -> ExecutionPauseRequested | ExecutionResumeRequested | ExecutionCancelRequested:
    match verb:
        case "pause":
            return ExecutionPauseRequested(execution_id, now)
        case "resume":
            return ExecutionResumeRequested(execution_id, now)
        case "cancel":
            return ExecutionCancelRequested(execution_id, reason, now)
        case _:
            raise AssertionError(f"unknown lifecycle verb {verb}")


def _split_child_input(
    spec: WorkflowSpec, command: StartChildExecution
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mistral: a workflow task's ``task_name`` and ``env`` are start params, not input.

    The child's env is the parent's, updated by an ``env`` the task passes.
    """
    declared = {p.name for p in spec.input}
    child_input = dict(command.input)
    params = dict(command.params)
    for key in ("task_name", "env"):
        if key in child_input and key not in declared:
            value = child_input.pop(key)
            if key == "env" and isinstance(value, Mapping):
                value = {**dict(params.get("env") or {}), **value}
            params[key] = value
    return child_input, params
