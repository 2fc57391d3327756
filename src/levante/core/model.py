"""The vocabulary of the pure core: records, events, commands and decisions.

Records are the rows the store keeps (one execution, its tasks, their assignments).
Events are past-tense facts that arrive at the core; commands are orders the engine
carries out after the core has decided. Everything is a frozen dataclass; time and ids
arrive inside events, so replaying the same events gives the same decisions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Final, TypeVar

from levante.errors import LevanteError
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId

R = TypeVar("R")
_FIELD_NAMES: dict[type, frozenset[str]] = {}


def replace(record: R, /, **changes: Any) -> R:
    """``dataclasses.replace`` for the core's frozen records, several times faster.

    The records have no ``__post_init__`` and no slots, so a copy of the instance
    dictionary with the changes applied is the same value ``dataclasses.replace`` would
    build; field names are still checked. (Every task and execution change in a decision
    goes through here.)
    """
    cls = type(record)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        if hasattr(cls, "__post_init__") or not hasattr(record, "__dict__"):
            return dataclasses.replace(record, **changes)  # type: ignore[type-var]
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    if not names.issuperset(changes):
        unknown = sorted(set(changes) - names)
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    copy = object.__new__(cls)
    state = copy.__dict__
    state.update(record.__dict__)
    state.update(changes)
    return copy


def quick_init(cls: type[R]) -> type[R]:
    """Give a frozen dataclass an ``__init__`` that fills the instance dictionary in
    one update; the generated one calls ``object.__setattr__`` once per field, twice as
    slow for the records a decision makes by the dozen. Same signature, defaults and
    default factories; for records without ``__post_init__``, slots or init=False fields.
    """
    params: list[str] = []
    body: list[str] = []
    scope: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    for f in fields(cls):  # type: ignore[arg-type]
        assert f.init and not f.kw_only, f"{cls.__name__}.{f.name}"
        if f.default is not dataclasses.MISSING:
            scope[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            body.append(f"    if {f.name} is _MISSING: {f.name} = _factory_{f.name}()")
        else:
            params.append(f.name)
    assert not hasattr(cls, "__post_init__") and hasattr(cls, "__dict__")
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    body.append(f"    self.__dict__.update({', '.join(f'{n}={n}' for n in names)})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body)
    exec(source, scope)  # our own field names only, as dataclasses itself does
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class ExecutionState(StrEnum):
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_EXECUTION_STATES


_FINAL_EXECUTION_STATES = frozenset(
    {ExecutionState.SUCCESS, ExecutionState.ERROR, ExecutionState.CANCELLED}
)


class TaskState(StrEnum):
    IDLE = "IDLE"
    WAITING = "WAITING"  # a join waiting for its inbound tasks
    RUNNING = "RUNNING"
    RUNNING_DELAYED = "RUNNING_DELAYED"
    PAUSED = "PAUSED"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_TASK_STATES


_FINAL_TASK_STATES = frozenset({TaskState.SUCCESS, TaskState.ERROR, TaskState.CANCELLED})


class AssignmentState(StrEnum):
    HELD = "HELD"  # created but held back (with-items concurrency)
    QUEUED = "QUEUED"  # ready, waiting for a worker
    LEASED = "LEASED"  # handed to a worker whose lease is live
    DEFERRED = "DEFERRED"  # the action is asynchronous; the outcome comes through TaskComplete
    CHILD = "CHILD"  # a subworkflow execution carries it out
    PAUSED = "PAUSED"  # queued when its execution was paused; queued again at resume
    DONE = "DONE"  # outcome recorded
    CANCELLED = "CANCELLED"  # its execution ended before it ran


@quick_init
@dataclass(frozen=True)
class Outcome:
    """What an action produced: a result, or an error (data, not an exception)."""

    ok: bool
    value: Any = None

    @staticmethod
    def success(value: Any = None) -> Outcome:
        return Outcome(True, value)

    @staticmethod
    def failure(error: Any) -> Outcome:
        return Outcome(False, error)


# ---------------------------------------------------------------- records


@quick_init
@dataclass(frozen=True)
class ExecutionRecord:
    id: ExecutionId
    workflow: str
    definition_id: DefinitionId
    state: ExecutionState
    input: Mapping[str, Any]
    params: Mapping[str, Any]
    context: Mapping[str, Any]  # input and vars: every start task's inbound context
    created_at: float
    updated_at: float
    state_info: str = ""
    output: Any = None
    final_context: Mapping[str, Any] = field(default_factory=dict)  # merged end-task contexts
    active_tasks: int = 0  # tasks neither final nor waiting on a join
    waiting_tasks: int = 0  # joins waiting for inbound tasks
    next_seq: int = 1  # sequence for this execution's task ids
    errors: tuple[str, ...] = ()  # unhandled task errors, in order
    request_id: str | None = None
    parent_task_id: TaskId | None = None  # set for a subworkflow's execution
    item: int | None = None  # the parent's with-items index of this subworkflow
    # While PAUSED: what to carry on with at resume (a finished task's transitions, a
    # fired timer, a task held by pause-before). Small: only what happened while paused.
    backlog: tuple[Mapping[str, Any], ...] = ()

    @property
    def env(self) -> Mapping[str, Any]:
        env = self.params.get("env")
        return env if isinstance(env, Mapping) else {}


@quick_init
@dataclass(frozen=True)
class TaskRecord:
    id: TaskId
    execution_id: ExecutionId
    name: str
    seq: int
    state: TaskState
    in_context: Mapping[str, Any]
    created_at: float
    updated_at: float
    state_info: str = ""
    action: str | None = None
    result: Any = None
    published: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 0
    assignment_id: AssignmentId | None = None
    arrivals: tuple[str, ...] = ()  # inbound task names that reached this join
    has_next: bool = False  # some transition to another task was taken
    # Bookkeeping of policies in progress: retry count, with-items counters, a pending
    # wait-after, the child executions of a workflow task. Small: never grows with items.
    runtime: Mapping[str, Any] = field(default_factory=dict)


@quick_init
@dataclass(frozen=True)
class AssignmentRecord:
    """One try of one task, handed to one worker at a time."""

    id: AssignmentId
    task_id: TaskId
    execution_id: ExecutionId
    task_name: str
    action: str
    input: Any
    attempt: int
    state: AssignmentState
    created_at: float
    worker_id: str | None = None
    lease_expires_at: float | None = None
    outcome: Outcome | None = None
    item: int | None = None  # with-items index
    target: str | None = None  # only workers that declared this target may take it
    deadline: float | None = None  # the task's timeout: no lease runs past it


@dataclass(frozen=True)
class TimerRecord:
    """A durable timer: fires once at ``due_at`` on whichever engine is alive.

    ``kind`` says what it is for (wait-before, wait-after, retry, timeout); ids are
    derived from the task and attempt, so a timer is never scheduled twice.
    """

    id: str
    execution_id: ExecutionId
    kind: str
    due_at: float
    task_id: TaskId | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class ExecutionStarted:
    execution_id: ExecutionId
    workflow: str
    definition_id: DefinitionId
    input: Mapping[str, Any]
    params: Mapping[str, Any]
    request_id: str | None
    now: float
    parent_task_id: TaskId | None = None  # a subworkflow's parent task
    item: int | None = None


@quick_init
@dataclass(frozen=True)
class AssignmentCompleted:
    """A worker or an outside system reported the outcome of one assignment."""

    assignment_id: AssignmentId
    task_id: TaskId
    outcome: Outcome
    now: float


@quick_init
@dataclass(frozen=True)
class TaskFinished:
    """Internal: a task's work is over (an inline noop, an input that failed to evaluate)."""

    task_id: TaskId
    outcome: Outcome
    now: float
    state_info: str = ""


@dataclass(frozen=True)
class ExecutionDrained:
    """Internal: nothing runs any more but joins still wait: they can never fire."""

    execution_id: ExecutionId
    now: float


@dataclass(frozen=True)
class TimerFired:
    timer: TimerRecord
    now: float


@dataclass(frozen=True)
class ItemsSettled:
    """Internal: every with-items assignment of a task has its outcome."""

    task_id: TaskId
    now: float


@dataclass(frozen=True)
class ChildExecutionEnded:
    """Internal: a subworkflow ended; its parent task learns the outcome."""

    parent_task_id: TaskId
    child_execution_id: ExecutionId
    item: int | None
    outcome: Outcome
    now: float


@dataclass(frozen=True)
class ExecutionPauseRequested:
    execution_id: ExecutionId
    now: float


@dataclass(frozen=True)
class ExecutionResumeRequested:
    execution_id: ExecutionId
    now: float


@dataclass(frozen=True)
class ExecutionCancelRequested:
    execution_id: ExecutionId
    reason: str
    now: float


@dataclass(frozen=True)
class TaskRerunRequested:
    execution_id: ExecutionId
    task_name: str
    now: float


@dataclass(frozen=True)
class LeaseExpired:
    """The worker holding an assignment went silent past its lease: try again elsewhere."""

    assignment_id: AssignmentId
    now: float


@dataclass(frozen=True)
class BacklogResumed:
    """Internal: carry on with one thing the pause held back."""

    entry: Mapping[str, Any]
    now: float


Event = (
    ExecutionStarted
    | ExecutionPauseRequested
    | ExecutionResumeRequested
    | ExecutionCancelRequested
    | TaskRerunRequested
    | LeaseExpired
    | BacklogResumed
    | AssignmentCompleted
    | TaskFinished
    | ExecutionDrained
    | TimerFired
    | ItemsSettled
    | ChildExecutionEnded
)


# ---------------------------------------------------------------- commands


@quick_init
@dataclass(frozen=True)
class DispatchAssignment:
    """Queue this assignment for a worker that serves its action."""

    assignment: AssignmentRecord


@dataclass(frozen=True)
class StartTimer:
    timer: TimerRecord


@dataclass(frozen=True)
class CancelTimer:
    timer_id: str


@dataclass(frozen=True)
class FailTaskAssignments:
    """The task timed out: its open assignments end with this error; late outcomes are refused."""

    task_id: TaskId
    error: Any


@dataclass(frozen=True)
class VoidAssignment:
    """Tell the worker holding this assignment that it no longer counts."""

    assignment_id: AssignmentId
    reason: str


@dataclass(frozen=True)
class PauseAssignments:
    """The execution paused: its QUEUED assignments wait (PAUSED) instead."""

    execution_id: ExecutionId


@dataclass(frozen=True)
class ResumeAssignments:
    execution_id: ExecutionId


@dataclass(frozen=True)
class CancelExecutionWork:
    """The execution was cancelled: every open assignment and timer of it is void."""

    execution_id: ExecutionId


@dataclass(frozen=True)
class PropagateToChildren:
    """Apply the same lifecycle event to the execution's running subworkflows."""

    execution_id: ExecutionId
    event: str  # "pause", "resume" or "cancel"


@dataclass(frozen=True)
class StartChildExecution:
    """Start a subworkflow for a workflow task (in the same transaction)."""

    execution_id: ExecutionId
    parent_task_id: TaskId
    item: int | None
    workflow: str
    input: Mapping[str, Any]
    params: Mapping[str, Any]


Command = (
    DispatchAssignment
    | VoidAssignment
    | PauseAssignments
    | ResumeAssignments
    | CancelExecutionWork
    | PropagateToChildren
    | FailTaskAssignments
    | StartTimer
    | CancelTimer
    | StartChildExecution
)


@quick_init
@dataclass(frozen=True)
class HistoryEntry:
    """One state change, for the append-only history of an execution."""

    execution_id: ExecutionId
    kind: str  # "execution" or "task"
    state: str
    state_info: str
    cause: str  # the event that made it change
    at: float
    task_id: TaskId | None = None
    task_name: str | None = None
    seq: int = 0  # given by the store: order within the execution's history


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class OtherExecutions:
    """Tasks beyond the current execution's that ``tasks(...)`` expressions read.

    A decision never changes them. The core asks for them by raising
    :class:`TasksNeeded`; the engine reads them (without locking) and decides again.
    """

    # Executions other than the current one: their task rows as ``task()`` shows them.
    tasks: Mapping[ExecutionId, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    # A workflow task's id -> (id, state) of each execution it started.
    subworkflows: Mapping[TaskId, tuple[tuple[ExecutionId, str], ...]] = field(
        default_factory=dict
    )
    # What was read: (execution id, with its subworkflows' tasks too).
    read: frozenset[tuple[ExecutionId, bool]] = frozenset()
    # No more reads in this decision: the limit of executions read was reached.
    closed: bool = False

    def has(self, execution_id: ExecutionId, recursive: bool) -> bool:
        return (execution_id, True) in self.read or (
            not recursive and (execution_id, False) in self.read
        )


NO_OTHER_EXECUTIONS: Final = OtherExecutions()
#: The reads of other executions' tasks (one execution, or one with its subworkflows)
#: one decision may make; then ``closed`` is set and further reads fail the expression.
MAX_TASK_READS: Final = 32


class TasksNeeded(LevanteError):
    """The core needs another execution's tasks (or its subworkflows') to decide."""

    def __init__(self, execution_id: ExecutionId, recursive: bool) -> None:
        super().__init__(f"tasks of execution {execution_id} (recursive={recursive}) needed")
        self.execution_id = execution_id
        self.recursive = recursive


@quick_init
@dataclass(frozen=True)
class Snapshot:
    """What the engine loaded for one event: only the rows the event touches.

    ``tasks`` holds, by task name, the latest row of each task the event may read:
    the event's own task, joins among its successors, and tasks named in
    ``task('name')`` expressions.
    """

    execution: ExecutionRecord
    tasks: Mapping[str, TaskRecord] = field(default_factory=dict)
    task: TaskRecord | None = None
    assignment: AssignmentRecord | None = None
    # ItemsSettled: every assignment of the task; otherwise the next HELD one, if any.
    assignments: tuple[AssignmentRecord, ...] = ()
    # ExecutionCancelRequested: every task not yet finished.
    unfinished: tuple[TaskRecord, ...] = ()
    # Other executions' tasks that expressions asked for (tasks(id), recursive=true).
    others: OtherExecutions = NO_OTHER_EXECUTIONS


@quick_init
@dataclass(frozen=True)
class Decision:
    """The new state of the touched rows and what to do next.

    ``followups`` are internal events the engine decides in the same transaction.
    """

    execution: ExecutionRecord
    tasks: tuple[TaskRecord, ...] = ()  # inserted or updated rows
    assignments: tuple[AssignmentRecord, ...] = ()  # inserted or updated rows
    commands: tuple[Command, ...] = ()
    followups: tuple[Event, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
