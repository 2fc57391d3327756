"""Between protobuf messages and the engine's records: JSON fields and timestamps."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from levante.core.model import (
    AssignmentRecord,
    ExecutionRecord,
    HistoryEntry,
    Outcome,
    TaskRecord,
)
from levante.errors import InvalidArgumentError
from levante.v1 import levante_pb2 as pb


def parse_json(text: str, field: str, *, default: Any = None) -> Any:
    """Decode a *_json field; an empty string is ``default``."""
    if text == "":
        return default
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidArgumentError(f"{field}: not valid JSON: {e}") from e


def parse_json_object(text: str, field: str) -> dict[str, Any]:
    value = parse_json(text, field, default={})
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{field}: must be a JSON object, got {type(value).__name__}")
    return value


def outcome_of(message: pb.TaskCompleteRequest | pb.TaskResult) -> Outcome:
    kind = message.WhichOneof("outcome")
    if kind == "result_json":
        return Outcome.success(parse_json(message.result_json, "result_json"))
    if kind == "error_json":
        return Outcome.failure(parse_json(message.error_json, "error_json"))
    raise InvalidArgumentError("outcome: set result_json or error_json")


def dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def execution_status(execution: ExecutionRecord, tasks: list[TaskRecord]) -> pb.ExecutionStatus:
    return pb.ExecutionStatus(
        execution_id=execution.id,
        workflow=execution.workflow,
        state=execution.state.value,
        state_info=execution.state_info,
        input_json=dump_json(execution.input),
        output_json=dump_json(execution.output) if execution.state.is_final else "",
        params_json=dump_json(execution.params),
        parent_task_id=execution.parent_task_id or "",
        created_at=timestamp(execution.created_at),
        updated_at=timestamp(execution.updated_at),
        tasks=[task_status(t) for t in tasks],
    )


def task_status(task: TaskRecord) -> pb.TaskStatus:
    return pb.TaskStatus(
        id=task.id,
        name=task.name,
        state=task.state.value,
        state_info=task.state_info,
        action=task.action or "",
        published_json=dump_json(task.published),
        result_json=dump_json(task.result) if task.state.is_final else "",
        attempt=task.attempt,
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
        assignment_id=task.assignment_id or "",
        child_execution_ids=child_execution_ids(task),
        retry_count=int(task.runtime.get("retry_no", 0)),
    )


def child_execution_ids(task: TaskRecord) -> list[str]:
    """A workflow task's subworkflows: each is named after the assignment it carries out."""
    if not task.runtime.get("subworkflow"):
        return []
    items = task.runtime.get("items")
    if isinstance(items, int):
        return [f"{task.id}/{i}" for i in range(int(task.runtime.get("started", items)))]
    return [task.assignment_id] if task.assignment_id else []


def task_assignment(a: AssignmentRecord) -> pb.TaskAssignment:
    return pb.TaskAssignment(
        task_id=a.id,
        execution_id=a.execution_id,
        task_name=a.task_name,
        action=a.action,
        input_json=dump_json(a.input),
        attempt=a.attempt,
        lease_expires_at=timestamp(a.lease_expires_at or 0.0),
    )


def execution_summary(execution: ExecutionRecord) -> pb.ExecutionSummary:
    return pb.ExecutionSummary(
        execution_id=execution.id,
        workflow=execution.workflow,
        state=execution.state.value,
        state_info=execution.state_info,
        created_at=timestamp(execution.created_at),
        updated_at=timestamp(execution.updated_at),
        parent_task_id=execution.parent_task_id or "",
    )


def history_event(entry: HistoryEntry) -> pb.ExecutionEvent:
    return pb.ExecutionEvent(
        seq=entry.seq,
        at=timestamp(entry.at),
        kind=entry.kind,
        execution_id=entry.execution_id,
        task_id=entry.task_id or "",
        task_name=entry.task_name or "",
        state=entry.state,
        state_info=entry.state_info,
        cause=entry.cause,
    )


def current_events(execution: ExecutionRecord, tasks: list[TaskRecord]) -> list[pb.ExecutionEvent]:
    """How an execution stands now, as events with cause "current" (seq 0)."""
    events = [
        pb.ExecutionEvent(
            at=timestamp(execution.updated_at), kind="execution", execution_id=execution.id,
            state=execution.state.value, state_info=execution.state_info, cause="current",
        )
    ]  # fmt: skip
    events += [
        pb.ExecutionEvent(
            at=timestamp(t.updated_at), kind="task", execution_id=execution.id, task_id=t.id,
            task_name=t.name, state=t.state.value, state_info=t.state_info, cause="current",
        )
        for t in tasks
    ]  # fmt: skip
    return events
