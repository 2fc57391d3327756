"""decide(spec, snapshot, event) -> Decision: every rule of a workflow's progress.

This module is pure: no I/O, no clock, no randomness. The engine loads the rows an
event touches into a Snapshot, calls decide, writes the Decision back in the same
transaction, and decides the Decision's follow-up events before it commits.

Rules (Mistral's, for direct workflows; see docs/semantics.md for the differences):
- Contexts hold published data only. A start task's inbound context is empty; any
  other task's is its predecessor's outbound context (inbound updated with what the
  task published); a join deep-merges the outbound contexts that reached it.
- Expressions see, from lowest to highest priority: the workflow input, the workflow
  vars, the task's context; plus ``__env``, ``__execution`` and ``__task_execution``.
- A finished task's commands are the on-success (or on-error) entries whose condition
  holds, then the on-complete ones. The first fail / succeed / pause ends the list:
  task transitions before it are taken, the ones after it are dropped.
- An error is handled when its on-error clause produced a command (noop included).
  An unhandled error ends the execution in ERROR once nothing else runs.
- An expression that fails while starting a task (action, input) or while handling
  its completion (publish, conditions, command params) fails the task and, at once,
  the execution, as in Mistral.
- The final context is the deep merge of the outbound contexts of the tasks that took
  no transition to another task; ``output`` is evaluated over input, vars and it, and
  without ``output`` it is the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, assert_never

from levante.core import lifecycle
from levante.core.finishing import (
    complete_assignment,
    fail_stranded_joins,
    finish_task,
    items_settled,
    lease_expired,
    timer_fired,
)
from levante.core.model import (
    NO_OTHER_EXECUTIONS,
    AssignmentCompleted,
    BacklogResumed,
    ChildExecutionEnded,
    Decision,
    Event,
    ExecutionCancelRequested,
    ExecutionDrained,
    ExecutionPauseRequested,
    ExecutionRecord,
    ExecutionResumeRequested,
    ExecutionStarted,
    ExecutionState,
    ItemsSettled,
    LeaseExpired,
    OtherExecutions,
    Snapshot,
    TaskFinished,
    TaskRerunRequested,
    TimerFired,
    replace,
)
from levante.core.running import schedule
from levante.core.step import Step, error_message, merge_contexts, task_view
from levante.errors import ExpressionError, InvalidInputError
from levante.ids import AssignmentId
from levante.lang.spec import WorkflowSpec

__all__ = ["bind_input", "check_params", "decide", "error_message", "merge_contexts", "task_view"]


def bind_input(spec: WorkflowSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The workflow input with defaults filled in; InvalidInputError names what is off.

    Mistral's message shape: ``Invalid input [name=wf, class=..., missing=[...],
    unexpected=[...]]``; defaults are copied as written, not evaluated.
    """
    declared = {p.name for p in spec.input}
    unexpected = sorted(k for k in given if k not in declared)
    missing = sorted(p.name for p in spec.input if not p.has_default and p.name not in given)
    if missing or unexpected:
        parts = [f"name={spec.name}"]
        if missing:
            parts.append(f"missing={missing}")
        if unexpected:
            parts.append(f"unexpected={unexpected}")
        raise InvalidInputError(
            f"Invalid input [{', '.join(parts)}] (declared: {[p.name for p in spec.input]})"
        )
    return {p.name: given.get(p.name, p.default) for p in spec.input}


def check_params(spec: WorkflowSpec, params: Mapping[str, Any]) -> None:
    """Start params that the workflow cannot run with; InvalidInputError names them."""
    env = params.get("env")
    if env is not None and not isinstance(env, Mapping):
        raise InvalidInputError("params_json.env: must be a JSON object")
    task_name = params.get("task_name")
    if task_name is not None and not isinstance(task_name, str):
        raise InvalidInputError("params_json.task_name: must be a string")
    if spec.type == "reverse" and (task_name is None or task_name not in spec.tasks):
        raise InvalidInputError(
            f"Invalid task name [workflow={spec.name}, task_name={task_name}]: a reverse "
            "workflow needs params_json.task_name naming one of its tasks"
        )


def decide(
    spec: WorkflowSpec, snapshot: Snapshot | None, event: Event,
    others: OtherExecutions = NO_OTHER_EXECUTIONS,
) -> Decision:  # fmt: skip
    """The one transition function. ``snapshot`` is None only for ExecutionStarted.

    Raises :class:`TasksNeeded` when an expression reads tasks of other executions not
    in ``others`` (or ``snapshot.others``): read them and decide again.
    """
    if isinstance(event, ExecutionStarted):
        return _start(spec, event, others)
    assert snapshot is not None
    if others is not NO_OTHER_EXECUTIONS:
        snapshot = replace(snapshot, others=others)
    step = Step(spec, snapshot, event.now, type(event).__name__)
    match event:
        case ExecutionPauseRequested():
            lifecycle.pause(step)
        case ExecutionResumeRequested():
            lifecycle.resume(step)
        case ExecutionCancelRequested():
            lifecycle.cancel(step, event.reason)
        case TaskRerunRequested():
            lifecycle.rerun(step, event.task_name)
        case BacklogResumed():
            lifecycle.backlog_resumed(step, event)
        case LeaseExpired():
            lease_expired(step, event)
        case AssignmentCompleted():
            complete_assignment(step, event)
        case ChildExecutionEnded():
            complete_assignment(step, AssignmentCompleted(
                AssignmentId(event.child_execution_id), event.parent_task_id, event.outcome,
                event.now,
            ))  # fmt: skip
        case TaskFinished():
            task = snapshot.task
            assert task is not None and task.id == event.task_id
            finish_task(step, task, event.outcome, event.state_info)
        case ExecutionDrained():
            fail_stranded_joins(step)
        case TimerFired():
            timer_fired(step, event)
        case ItemsSettled():
            items_settled(step, event)
        case _:
            assert_never(event)
    return step.decision()


def _start(spec: WorkflowSpec, event: ExecutionStarted, others: OtherExecutions) -> Decision:
    execution = ExecutionRecord(
        id=event.execution_id,
        workflow=event.workflow,
        definition_id=event.definition_id,
        state=ExecutionState.RUNNING,
        input=dict(event.input),
        params=dict(event.params),
        context={},
        created_at=event.now,
        updated_at=event.now,
        request_id=event.request_id,
        parent_task_id=event.parent_task_id,
        item=event.item,
    )
    step = Step(spec, Snapshot(execution=execution, others=others), event.now, "ExecutionStarted",
                new_execution=True)  # fmt: skip
    try:
        variables = step.evaluate(dict(spec.vars), {}, None)
    except ExpressionError as e:
        step.end_execution(ExecutionState.ERROR, f"Failed to evaluate workflow vars: {e}")
        return step.decision()
    step.update_execution(context=variables)
    if spec.type == "reverse":
        target = str(execution.params.get("task_name"))
        starts = [n for n in spec.required_closure(target) if not spec.task(n).requires]
    else:
        starts = list(spec.start_task_names())
    for name in starts:
        schedule(step, name, {}, arrived_from=None)
    step.finish_execution_if_done()
    return step.decision()
