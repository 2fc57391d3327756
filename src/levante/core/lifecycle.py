"""Operators' events: pause, resume, cancel, rerun; and carrying on after a pause.

Rules:
- Pausing lets running actions finish but starts nothing new: queued assignments wait,
  finished tasks' transitions, fired timers and tasks held by pause-before go to the
  execution's backlog; resume carries on with the backlog in order.
- Cancelling marks every unfinished task CANCELLED, voids open assignments and timers,
  and refuses later outcomes; subworkflows follow their parent.
- Rerun takes a failed task of a failed execution, runs it again as a new attempt, and
  carries the execution on as if the error had not happened.
The engine checks that the request fits the execution's state before deciding.
"""

from __future__ import annotations

from levante.core.finishing import take_transitions
from levante.core.model import (
    BacklogResumed,
    CancelExecutionWork,
    ExecutionState,
    PauseAssignments,
    PropagateToChildren,
    ResumeAssignments,
    StartTimer,
    TaskState,
    TimerRecord,
)
from levante.core.running import start
from levante.core.step import Step
from levante.ids import ExecutionId, TaskId


def pause(step: Step) -> None:
    if step.execution.state != ExecutionState.RUNNING:
        return
    step.update_execution(state=ExecutionState.PAUSED)
    step.commands.append(PauseAssignments(step.execution.id))
    step.commands.append(PropagateToChildren(step.execution.id, "pause"))


def resume(step: Step) -> None:
    if step.execution.state != ExecutionState.PAUSED:
        return
    backlog = step.execution.backlog
    step.update_execution(state=ExecutionState.RUNNING, state_info="", backlog=())
    step.commands.append(ResumeAssignments(step.execution.id))
    step.commands.append(PropagateToChildren(step.execution.id, "resume"))
    for entry in backlog:
        if entry.get("kind") == "timer":
            timer = dict(entry["timer"])
            step.commands.append(StartTimer(TimerRecord(
                id=str(timer["id"]), execution_id=ExecutionId(str(timer["execution_id"])),
                kind=str(timer["kind"]), due_at=step.now,
                task_id=None if timer.get("task_id") is None else TaskId(str(timer["task_id"])),
                payload=dict(timer.get("payload") or {}),
            )))  # fmt: skip
        else:
            step.followups.append(BacklogResumed(entry, step.now))
    if not backlog:
        step.finish_execution_if_done()


def backlog_resumed(step: Step, event: BacklogResumed) -> None:
    task = step.snapshot.task
    if task is None or not step.running:
        return
    match event.entry.get("kind"):
        case "transitions":
            take_transitions(step, task, int(event.entry.get("skip", 0)),
                             bool(event.entry.get("took_task")),
                             bool(event.entry.get("ignore_pause")))  # fmt: skip
        case "start":
            if task.state == TaskState.IDLE:
                start(step, step.put_task(task, state=TaskState.RUNNING))
        case other:
            raise AssertionError(f"unknown backlog entry {other}")


def cancel(step: Step, reason: str) -> None:
    if step.execution.state.is_final:
        return
    for task in step.snapshot.unfinished:
        step.put_task(task, state=TaskState.CANCELLED, state_info=reason)
    step.update_execution(
        state=ExecutionState.CANCELLED, state_info=reason, output={"result": reason},
        active_tasks=0, waiting_tasks=0, backlog=(),
    )  # fmt: skip
    # Children first: voiding the parent's work also voids the handles of its children.
    step.commands.append(PropagateToChildren(step.execution.id, "cancel"))
    step.commands.append(CancelExecutionWork(step.execution.id))


def rerun(step: Step, task_name: str) -> None:
    task = step.snapshot.task
    assert task is not None and task.name == task_name
    if step.execution.state != ExecutionState.ERROR or task.state != TaskState.ERROR:
        return
    errors = tuple(e for e in step.execution.errors if e.split("\t")[1:2] != [task.id])
    step.update_execution(
        state=ExecutionState.RUNNING, state_info="", output=None, errors=errors,
        active_tasks=step.execution.active_tasks + 1,
    )  # fmt: skip
    fresh = step.put_task(
        task, state=TaskState.RUNNING, state_info="", result=None, published={},
        runtime={"rerun": int(task.runtime.get("rerun", 0)) + 1}, has_next=False,
    )  # fmt: skip
    start(step, fresh)
