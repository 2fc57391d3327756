"""Typed ids, so that an execution id cannot be passed where a task id is wanted."""

from __future__ import annotations

from typing import NewType

ExecutionId = NewType("ExecutionId", str)
TaskId = NewType("TaskId", str)
AssignmentId = NewType("AssignmentId", str)
WorkerId = NewType("WorkerId", str)
DefinitionId = NewType("DefinitionId", int)


def task_id_for(execution_id: ExecutionId, seq: int) -> TaskId:
    """Task ids derive from the execution and its sequence counter: pure and replayable."""
    return TaskId(f"{execution_id}.{seq}")
