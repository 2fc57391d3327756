"""The lazy engine: lock -> load -> decide -> save -> commit -> wake.

An Engine holds no execution state between calls. Each verb is one store
transaction that loads only the rows its event touches (the execution row, the task,
the successors that are joins, the tasks named in ``task('x')`` expressions), asks the
pure core what follows, writes the decision back, and decides any follow-up events
(tasks that finish inline, such as ``std.noop`` tasks) in the same transaction. Workers
are woken only after the commit. Parsed workflow definitions are cached: they are
immutable and derived from the store.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from levante.core.decide import bind_input, decide
from levante.core.model import (
    AssignmentCompleted,
    AssignmentState,
    CancelQueuedAssignments,
    Decision,
    DispatchAssignment,
    Event,
    ExecutionDrained,
    ExecutionRecord,
    ExecutionStarted,
    Outcome,
    Snapshot,
    TaskFinished,
    TaskRecord,
)
from levante.core.support import unsupported_features
from levante.errors import (
    AlreadyCompletedError,
    ConflictError,
    DefinitionError,
    InvalidInputError,
    NotFoundError,
)
from levante.ids import AssignmentId, DefinitionId, ExecutionId
from levante.lang import expressions
from levante.lang.parser import parse_document
from levante.lang.spec import Document, WorkflowSpec
from levante.store.base import Store

log = logging.getLogger("levante.engine")

# A cascade of tasks that finish inline (noop tasks) in one transaction stops here,
# so that a cycle of action-less tasks cannot spin forever inside the store.
MAX_STEPS_PER_TRANSACTION = 10_000


@dataclass(frozen=True)
class _WorkflowIndex:
    """What the engine derives once per workflow version to load only what it needs."""

    spec: WorkflowSpec
    referenced: frozenset[str]  # task names read by task('x') expressions
    join_successors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def names_to_load(self, task_name: str) -> set[str]:
        return {task_name, *self.join_successors.get(task_name, ()), *self.referenced}


def _index(spec: WorkflowSpec) -> _WorkflowIndex:
    referenced: set[str] = set()
    dynamic = False
    for task in spec.tasks.values():
        values: list[Any] = [
            task.action, task.workflow, dict(task.input), dict(task.publish),
            dict(task.publish_on_error),
        ]  # fmt: skip
        for clause in task.clauses():
            values.extend((t.condition, dict(t.params)) for t in clause.transitions)
        names = expressions.referenced_task_names(values)
        if names is None:
            dynamic = True
        else:
            referenced |= names
    for value in (spec.output, spec.output_on_error):
        names = expressions.referenced_task_names(value)
        if names is None:
            dynamic = True
        else:
            referenced |= names
    if dynamic:
        referenced = set(spec.tasks)
    join_successors = {
        name: tuple(n for n in task.next_task_names() if spec.task(n).join is not None)
        for name, task in spec.tasks.items()
    }
    return _WorkflowIndex(spec, frozenset(referenced & set(spec.tasks)), join_successors)


class Engine:
    """The two verbs (run, complete) plus registration and reads, over one Store."""

    def __init__(
        self,
        store: Store,
        *,
        on_dispatch: Callable[[Collection[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
        new_execution_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.store = store
        self._on_dispatch = on_dispatch
        self._clock = clock
        self._new_execution_id = new_execution_id
        self._documents: dict[DefinitionId, Document] = {}
        self._indexes: dict[tuple[DefinitionId, str], _WorkflowIndex] = {}

    def set_dispatch_listener(self, listener: Callable[[Collection[str]], None]) -> None:
        self._on_dispatch = listener

    # -- definitions

    async def register(self, text: str) -> list[str]:
        """Parse, validate and store a document; returns the workflow names it defines."""
        document = parse_document(text)
        unsupported = unsupported_features(document)
        if unsupported:
            line, message = unsupported[0]
            raise DefinitionError(message, line)
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
            document = parse_document(stored.text)
            self._documents[definition_id] = document
        spec = document.workflows.get(name)
        if spec is None:
            raise NotFoundError(f"workflow '{name}' not found in definition {definition_id}")
        index = self._indexes[key] = _index(spec)
        return index

    async def find_workflow(self, name: str) -> tuple[DefinitionId, WorkflowSpec]:
        stored = await self.store.find_workflow(name)
        if stored is None:
            raise NotFoundError(f"workflow '{name}' not found")
        index = await self._workflow(stored.id, name)
        return stored.id, index.spec

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
        if definition:
            await self.register(definition)
        if not workflow:
            raise InvalidInputError("workflow: a workflow name is required")
        definition_id, spec = await self.find_workflow(workflow)
        params = dict(params or {})
        _check_params(params)
        bound = bind_input(spec, dict(input or {}))
        index = await self._workflow(definition_id, workflow)
        dispatched: set[str] = set()
        async with self.store.transaction() as tx:
            if request_id:
                existing = await tx.find_execution_by_request_id(request_id)
                if existing is not None:
                    return existing
            event = ExecutionStarted(
                execution_id=ExecutionId(self._new_execution_id()),
                workflow=workflow,
                definition_id=definition_id,
                input=bound,
                params=params,
                request_id=request_id or None,
                now=self._clock(),
            )
            decision = decide(spec, None, event)
            await tx.insert_execution(decision.execution)
            await self._apply(tx, index, decision, dispatched)
        self._wake(dispatched)
        return event.execution_id

    # -- TaskComplete

    async def complete(self, assignment_id: AssignmentId, outcome: Outcome) -> None:
        """Record one assignment's outcome and queue what became ready, in one transaction.

        The same outcome twice is accepted once; a different outcome for an assignment
        already completed raises AlreadyCompletedError.
        """
        found = await self.store.get_assignment(assignment_id)
        if found is None:
            raise NotFoundError(f"task_id '{assignment_id}' not found")
        dispatched: set[str] = set()
        async with self.store.transaction() as tx:
            execution = await tx.lock_execution(found.execution_id)
            assignment = await tx.get_assignment(assignment_id)
            if execution is None or assignment is None:
                raise NotFoundError(f"task_id '{assignment_id}' not found")
            if assignment.state == AssignmentState.DONE:
                if assignment.outcome == outcome:
                    return
                raise AlreadyCompletedError(
                    f"task_id '{assignment_id}' already completed with a different outcome"
                )
            if assignment.state == AssignmentState.CANCELLED:
                raise ConflictError(
                    f"task_id '{assignment_id}' was cancelled: execution {execution.id} "
                    f"is {execution.state.value}"
                )
            task = await tx.get_task(assignment.task_id)
            if task is None:
                raise NotFoundError(f"task '{assignment.task_id}' not found")
            index = await self._workflow(execution.definition_id, execution.workflow)
            snapshot = Snapshot(
                execution=execution,
                tasks=await tx.latest_tasks(execution.id, index.names_to_load(task.name)),
                task=task,
                assignment=assignment,
            )
            event = AssignmentCompleted(assignment.id, task.id, outcome, self._clock())
            decision = decide(index.spec, snapshot, event)
            await self._apply(tx, index, decision, dispatched)
        self._wake(dispatched)

    # -- reads

    async def get_status(
        self, execution_id: ExecutionId
    ) -> tuple[ExecutionRecord, list[TaskRecord]]:
        execution = await self.store.get_execution(execution_id)
        if execution is None:
            raise NotFoundError(f"execution '{execution_id}' not found")
        return execution, await self.store.list_tasks(execution_id)

    # -- the loop around decide

    async def _apply(
        self, tx: Any, index: _WorkflowIndex, first: Decision, dispatched: set[str]
    ) -> None:
        """Write a decision, then decide and write its follow-ups, all in ``tx``."""
        pending: deque[Decision] = deque([first])
        steps = 0
        while pending:
            decision = pending.popleft()
            await tx.save_tasks(decision.tasks)
            await tx.save_assignments(decision.assignments)
            await tx.update_execution(decision.execution)
            for command in decision.commands:
                match command:
                    case DispatchAssignment(assignment=a):
                        dispatched.add(a.action)
                    case CancelQueuedAssignments(execution_id=execution_id):
                        await tx.cancel_queued_assignments(execution_id)
            for followup in decision.followups:
                steps += 1
                if steps > MAX_STEPS_PER_TRANSACTION:
                    raise ConflictError(
                        f"execution {decision.execution.id}: more than "
                        f"{MAX_STEPS_PER_TRANSACTION} inline steps in one transaction "
                        "(a cycle of tasks without actions?)"
                    )
                snapshot = await self._load(tx, index, decision.execution, followup)
                pending.append(decide(index.spec, snapshot, followup))

    async def _load(
        self, tx: Any, index: _WorkflowIndex, execution: ExecutionRecord, event: Event
    ) -> Snapshot:
        match event:
            case TaskFinished(task_id=task_id):
                task = await tx.get_task(task_id)
                assert task is not None, f"follow-up for unknown task {task_id}"
                names = index.names_to_load(task.name)
                return Snapshot(execution, await tx.latest_tasks(execution.id, names), task)
            case ExecutionDrained():
                waiting = await tx.waiting_tasks(execution.id)
                return Snapshot(execution, {t.name: t for t in waiting})
            case _:
                raise AssertionError(f"not a follow-up event: {event!r}")

    def _wake(self, actions: Collection[str]) -> None:
        if actions and self._on_dispatch is not None:
            self._on_dispatch(actions)


def _check_params(params: Mapping[str, Any]) -> None:
    env = params.get("env")
    if env is not None and not isinstance(env, Mapping):
        raise InvalidInputError("params_json.env: must be a JSON object")
    task_name = params.get("task_name")
    if task_name is not None and not isinstance(task_name, str):
        raise InvalidInputError("params_json.task_name: must be a string")

