"""Records <-> SQL rows, shared by the SQL backends.

Column lists are the single source of truth for each table's layout; JSON values are
stored as text so that one schema serves SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from levante.core.model import (
    AssignmentRecord,
    AssignmentState,
    ExecutionRecord,
    ExecutionState,
    HistoryEntry,
    Outcome,
    TaskRecord,
    TaskState,
    TimerRecord,
)
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId

EXECUTION_COLUMNS = (
    "id", "workflow", "definition_id", "state", "state_info", "input", "params", "context",
    "output", "final_context", "active_tasks", "waiting_tasks", "next_seq", "errors",
    "request_id", "created_at", "updated_at", "parent_task_id", "item", "backlog",
)  # fmt: skip

TASK_COLUMNS = (
    "id", "execution_id", "name", "seq", "state", "state_info", "action", "in_context",
    "result", "published", "attempt", "assignment_id", "arrivals", "has_next",
    "created_at", "updated_at", "runtime",
)  # fmt: skip

ASSIGNMENT_COLUMNS = (
    "id", "task_id", "execution_id", "task_name", "action", "input", "attempt", "state",
    "worker_id", "lease_expires_at", "outcome_ok", "outcome", "created_at", "item", "target",
    "deadline",
)  # fmt: skip


TIMER_COLUMNS = ("id", "execution_id", "task_id", "kind", "due_at", "payload")


def dump(value: Any) -> str:
    # Most JSON columns hold null, {} or [] (nothing published, no errors, no backlog):
    # those skip the encoder, which costs more than the rest of a row.
    if value is None:
        return "null"
    kind = type(value)
    if not value and (kind is dict or kind is list or kind is tuple):
        return "{}" if kind is dict else "[]"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def load(text: str | None) -> Any:
    if text is None or text == "null":
        return None
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)


def execution_row(e: ExecutionRecord) -> tuple[Any, ...]:
    return (
        e.id, e.workflow, int(e.definition_id), e.state.value, e.state_info, dump(e.input),
        dump(e.params), dump(e.context), dump(e.output), dump(e.final_context), e.active_tasks,
        e.waiting_tasks, e.next_seq, dump(list(e.errors)), e.request_id, e.created_at,
        e.updated_at, e.parent_task_id, e.item, dump(list(e.backlog)),
    )  # fmt: skip


def execution_from_row(r: Sequence[Any]) -> ExecutionRecord:
    return ExecutionRecord(
        id=ExecutionId(r[0]),
        workflow=r[1],
        definition_id=DefinitionId(int(r[2])),
        state=ExecutionState(r[3]),
        state_info=r[4],
        input=load(r[5]),
        params=load(r[6]),
        context=load(r[7]),
        output=load(r[8]),
        final_context=load(r[9]),
        active_tasks=int(r[10]),
        waiting_tasks=int(r[11]),
        next_seq=int(r[12]),
        errors=tuple(load(r[13])),
        request_id=r[14],
        created_at=float(r[15]),
        updated_at=float(r[16]),
        parent_task_id=None if r[17] is None else TaskId(r[17]),
        item=None if r[18] is None else int(r[18]),
        backlog=tuple(load(r[19])),
    )


def task_row(t: TaskRecord) -> tuple[Any, ...]:
    return (
        t.id, t.execution_id, t.name, t.seq, t.state.value, t.state_info, t.action,
        dump(t.in_context), dump(t.result), dump(t.published), t.attempt, t.assignment_id,
        dump(list(t.arrivals)), 1 if t.has_next else 0, t.created_at, t.updated_at,
        dump(t.runtime),
    )  # fmt: skip


def task_from_row(r: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        id=TaskId(r[0]),
        execution_id=ExecutionId(r[1]),
        name=r[2],
        seq=int(r[3]),
        state=TaskState(r[4]),
        state_info=r[5],
        action=r[6],
        in_context=load(r[7]),
        result=load(r[8]),
        published=load(r[9]),
        attempt=int(r[10]),
        assignment_id=None if r[11] is None else AssignmentId(r[11]),
        arrivals=tuple(load(r[12])),
        has_next=bool(r[13]),
        created_at=float(r[14]),
        updated_at=float(r[15]),
        runtime=load(r[16]),
    )


def assignment_row(a: AssignmentRecord) -> tuple[Any, ...]:
    outcome_ok = None if a.outcome is None else (1 if a.outcome.ok else 0)
    outcome = None if a.outcome is None else dump(a.outcome.value)
    return (
        a.id, a.task_id, a.execution_id, a.task_name, a.action, dump(a.input), a.attempt,
        a.state.value, a.worker_id, a.lease_expires_at, outcome_ok, outcome, a.created_at,
        a.item, a.target, a.deadline,
    )  # fmt: skip


def assignment_from_row(r: Sequence[Any]) -> AssignmentRecord:
    outcome = None if r[10] is None else Outcome(bool(r[10]), load(r[11]))
    return AssignmentRecord(
        id=AssignmentId(r[0]),
        task_id=TaskId(r[1]),
        execution_id=ExecutionId(r[2]),
        task_name=r[3],
        action=r[4],
        input=load(r[5]),
        attempt=int(r[6]),
        state=AssignmentState(r[7]),
        worker_id=r[8],
        lease_expires_at=None if r[9] is None else float(r[9]),
        outcome=outcome,
        created_at=float(r[12]),
        item=None if r[13] is None else int(r[13]),
        target=r[14],
        deadline=None if r[15] is None else float(r[15]),
    )


def timer_row(t: TimerRecord) -> tuple[Any, ...]:
    return (t.id, t.execution_id, t.task_id, t.kind, t.due_at, dump(t.payload))


def timer_from_row(r: Sequence[Any]) -> TimerRecord:
    return TimerRecord(
        id=r[0],
        execution_id=ExecutionId(r[1]),
        task_id=None if r[2] is None else TaskId(r[2]),
        kind=r[3],
        due_at=float(r[4]),
        payload=load(r[5]),
    )


def history_from_row(r: Sequence[Any]) -> HistoryEntry:
    """(seq, execution_id, kind, task_id, task_name, state, state_info, cause, at)."""
    return HistoryEntry(
        execution_id=ExecutionId(r[1]),
        kind=r[2],
        task_id=None if r[3] is None else TaskId(r[3]),
        task_name=r[4],
        state=r[5],
        state_info=r[6],
        cause=r[7],
        at=float(r[8]),
        seq=int(r[0]),
    )
