"""Starting tasks: joins, wait-before, actions (ad-hoc ones resolved), with-items, subworkflows.

Rules:
- A join (or, in a reverse workflow, a task with requires) waits in one WAITING row
  until enough inbound tasks have reached it; their contexts are deep-merged.
- wait-before delays the start with a durable timer; timeout starts one as the task
  starts.
- with-items creates one assignment per item up front, in item order; beyond the
  task's concurrency they are HELD and released one per finished item.
- A workflow task starts one child execution per item; each is tracked by an
  assignment in state CHILD, so with-items, retry and results work the same way.
- Any expression that fails while starting a task fails the task and the execution.
- Policy values are checked once evaluated (``policy_seconds``, ``policy_count``,
  ``policy_flag``, also used after a try): one of the wrong type fails the task like a
  failing expression, in Mistral's words (``Invalid data type in TimeoutPolicy: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from levante.core.model import (
    AssignmentRecord,
    AssignmentState,
    DispatchAssignment,
    ExecutionState,
    Outcome,
    PauseAssignments,
    StartChildExecution,
    StartTimer,
    TaskFinished,
    TaskRecord,
    TaskState,
    TimerRecord,
    replace,
)
from levante.core.step import Step, merge_by_version, outbound_context
from levante.errors import ExpressionError
from levante.ids import AssignmentId, ExecutionId, task_id_for
from levante.lang.spec import ActionSpec, TaskSpec
from levante.limits import with_items_message

NOOP_ACTION = "std.noop"
MAX_ADHOC_DEPTH = 16


class TaskStartError(Exception):
    """Internal: a task cannot start (an expression failed, bad input)."""


def schedule(step: Step, name: str, context: Mapping[str, Any], arrived_from: str | None) -> None:
    """A transition (or the start) reached task ``name`` with ``context``."""
    spec = step.spec
    task_spec = spec.task(name)
    waits = task_spec.join is not None or (spec.type == "reverse" and bool(task_spec.requires))
    if waits and arrived_from is not None:
        _arrive(step, name, context, arrived_from)
        return
    task = _new_task(step, name, TaskState.RUNNING, context,
                     active_tasks=step.execution.active_tasks + 1)  # fmt: skip
    start(step, task)


def _new_task(
    step: Step, name: str, state: TaskState, context: Mapping[str, Any], **counts: int
) -> TaskRecord:
    """A new task row; the execution's sequence moves on (and its ``counts`` change)."""
    seq = step.execution.next_seq
    step.update_execution(next_seq=seq + 1, **counts)
    return step.put_task(
        TaskRecord(
            id=task_id_for(step.execution.id, seq),
            execution_id=step.execution.id,
            name=name,
            seq=seq,
            state=state,
            in_context=dict(context),
            created_at=step.now,
            updated_at=step.now,
        )
    )


def _needed(step: Step, name: str) -> int:
    task_spec = step.spec.task(name)
    if step.spec.type == "reverse" or task_spec.join == "all":
        return len(step.spec.inbound_task_names(name))
    if task_spec.join == "one":
        return 1
    assert isinstance(task_spec.join, int)
    return task_spec.join


def _arrive(step: Step, name: str, context: Mapping[str, Any], arrived_from: str) -> None:
    latest = step.latest.get(name)
    if latest is not None and latest.state != TaskState.WAITING and arrived_from not in (
        latest.arrivals
    ):
        # A late inbound of a join that fired already (join: N, one): Mistral keeps one
        # task execution per join, so the arrival is noted and nothing starts again.
        step.put_task(latest, arrivals=(*latest.arrivals, arrived_from))
        return
    if latest is not None and latest.state == TaskState.WAITING:
        waiting = latest
    else:
        waiting = _new_task(step, name, TaskState.WAITING, {},
                            waiting_tasks=step.execution.waiting_tasks + 1)  # fmt: skip
    waiting = step.put_task(
        waiting,
        arrivals=(*waiting.arrivals, arrived_from),
        in_context=merge_by_version(waiting.in_context, context),
    )
    needed = _needed(step, name)
    if len(waiting.arrivals) < needed or len(set(waiting.arrivals)) < needed:
        return  # (the count first: the set only once enough may have arrived)
    step.update_execution(
        waiting_tasks=step.execution.waiting_tasks - 1,
        active_tasks=step.execution.active_tasks + 1,
    )
    start(step, step.put_task(waiting, state=TaskState.RUNNING))


def force_fail(step: Step, task: TaskRecord, message: str) -> None:
    """Mistral's forced failure: the task, then at once the execution, end in ERROR.

    No on-error runs. The task took no transition, so its context is in the final
    context that ``output-on-error`` sees, as any end task's is.
    """
    if not task.state.is_final:
        step.update_execution(active_tasks=step.execution.active_tasks - 1)
    task = step.put_task(task, state=TaskState.ERROR, state_info=message)
    outbound = outbound_context(task.in_context, task.published)
    step.update_execution(final_context=merge_by_version(step.execution.final_context, outbound))
    step.end_execution(ExecutionState.ERROR, message)


def fail_to_start(step: Step, task: TaskRecord, error: Exception) -> None:
    """Mistral: a task that cannot start fails, and so does its execution, at once."""
    message = f"Failed to run task [error={error}, wf={step.spec.name}, task={task.name}]"
    current = step.current(task)
    if step.spec.task(task.name).with_items is not None:
        current = replace(current, result=[])  # Mistral: a with-items task's result is a list
    force_fail(step, current, message)


def _policy(step: Step, task: TaskRecord, value: Any, what: str) -> Any:
    if value is None:
        return None
    try:
        return step.evaluate(value, task.in_context, task)
    except ExpressionError as e:
        raise TaskStartError(f"{what}: {e}") from e


# Mistral checks each policy's evaluated values against a schema and names the policy
# class when one has the wrong type (``Invalid data type in WaitBeforePolicy: ...``).
# None (an expression that found nothing) leaves the policy off; a boolean is no number.
_POLICY_CLASSES = {
    "retry count": "RetryPolicy", "retry delay": "RetryPolicy", "timeout": "TimeoutPolicy",
    "wait-before": "WaitBeforePolicy", "wait-after": "WaitAfterPolicy",
    "pause-before": "PauseBeforePolicy", "concurrency": "ConcurrencyPolicy",
}  # fmt: skip


def _invalid_policy(what: str, value: Any, wanted: str) -> TaskStartError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return TaskStartError(
        f"Invalid data type in {_POLICY_CLASSES[what]}: {what} must be {wanted}, not {shown}"
    )


def policy_seconds(what: str, value: Any) -> float:
    """An evaluated duration: a finite number of seconds >= 0 (fractions too)."""
    if value is None:
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    raise _invalid_policy(what, value, "a number of seconds >= 0")


def policy_count(what: str, value: Any) -> int:
    """An evaluated count: a whole number >= 0 (``2.0`` is 2, as in Mistral's schema)."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():  # false for nan and infinities
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _invalid_policy(what, value, "a whole number >= 0")


def policy_flag(what: str, value: Any) -> bool:
    """An evaluated switch: true or false."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise _invalid_policy(what, value, "true or false")


def start(step: Step, task: TaskRecord) -> None:
    """Start a RUNNING task: wait-before, timeout, then its action(s) or subworkflow(s)."""
    try:
        _start(step, task)
    except (TaskStartError, ExpressionError) as e:
        fail_to_start(step, task, e)


def _start(step: Step, task: TaskRecord) -> None:
    task_spec = step.spec.task(task.name)
    policies = task_spec.policies
    if not task.runtime.get("paused_before") and policy_flag(
        "pause-before", _policy(step, task, policies.pause_before, "pause-before")
    ):
        step.put_task(task, state=TaskState.IDLE,
                      runtime={**task.runtime, "paused_before": True})  # fmt: skip
        if step.execution.state != ExecutionState.PAUSED:
            step.update_execution(state=ExecutionState.PAUSED)
            step.commands.append(PauseAssignments(step.execution.id))
        step.add_backlog({"kind": "start", "task_id": task.id})
        return
    if not task.runtime.get("waited_before"):
        delay = policy_seconds(
            "wait-before", _policy(step, task, policies.wait_before, "wait-before")
        )
        if delay > 0:
            step.put_task(task, state=TaskState.RUNNING_DELAYED,
                          runtime={**task.runtime, "waited_before": True})  # fmt: skip
            step.commands.append(StartTimer(TimerRecord(
                id=f"{task.id}:wait-before", execution_id=task.execution_id,
                kind="wait-before", due_at=step.now + delay, task_id=task.id,
            )))  # fmt: skip
            return
    timeout = policy_seconds("timeout", _policy(step, task, policies.timeout, "timeout"))
    if timeout > 0:
        task = step.put_task(step.current(task), runtime={
            **step.current(task).runtime, "deadline": step.now + timeout})  # fmt: skip
        step.commands.append(StartTimer(TimerRecord(
            id=f"{task.id}:timeout", execution_id=task.execution_id, kind="timeout",
            due_at=step.now + timeout, task_id=task.id, payload={"seconds": timeout},
        )))  # fmt: skip
    if task_spec.workflow is not None:
        task = step.put_task(step.current(task),
                             runtime={**task.runtime, "subworkflow": True})  # fmt: skip
    if task_spec.with_items is not None:
        _start_items(step, task, task_spec)
        return
    attempt = task.attempt + 1  # 1, or the next one when the task is rerun
    made = make_assignment(step, task, attempt=attempt, item=None, item_context={})
    if made is None:
        return  # an inline noop: finished through a follow-up
    first, action = made
    step.put_task(step.current(task), state=TaskState.RUNNING, attempt=attempt,
                  assignment_id=first.id, action=action)  # fmt: skip
    release(step, first)


def _start_items(step: Step, task: TaskRecord, task_spec: TaskSpec) -> None:
    assert task_spec.with_items is not None
    lists: list[tuple[str, list[Any]]] = []
    for name, source in task_spec.with_items.variables:
        value = _policy(step, task, source, "with-items")
        if not isinstance(value, list):
            raise TaskStartError(
                f"Invalid array in 'with-items' clause: {name} is {type(value).__name__}, "
                "not a list"
            )
        lists.append((name, value))
    lengths = {len(values) for _, values in lists}
    if len(lengths) > 1:
        raise TaskStartError("Invalid array in 'with-items' clause: arrays of different lengths")
    count = lengths.pop() if lengths else 0
    if step.spec.max_with_items is not None and count > step.spec.max_with_items:
        raise TaskStartError(with_items_message(count, step.spec.max_with_items))
    concurrency = policy_count(
        "concurrency", _policy(step, task, task_spec.policies.concurrency, "concurrency")
    )
    limit = count if not concurrency else min(count, concurrency)
    attempt = task.attempt + 1
    runtime = {**task.runtime, "items": count, "started": limit, "done": 0}
    if count == 0:
        step.put_task(task, runtime=runtime)
        step.followups.append(TaskFinished(task.id, Outcome.success([]), step.now))
        return
    for index in range(count):
        item_context = {name: values[index] for name, values in lists}
        made = make_assignment(step, task, attempt, item=index, item_context=item_context)
        assert made is not None
        assignment, action = made
        if action != step.current(task).action:  # the action the task asked for
            step.put_task(step.current(task), action=action)
        if index < limit:
            release(step, assignment)
        else:
            step.put_assignment(replace(assignment, state=AssignmentState.HELD))
    step.put_task(step.current(task), attempt=attempt, runtime=runtime)


def assignment_id(task: TaskRecord, item: int | None, attempt: int) -> AssignmentId:
    base = task.id if item is None else f"{task.id}/{item}"
    return AssignmentId(base if attempt == 1 else f"{base}#{attempt}")


def make_assignment(
    step: Step,
    task: TaskRecord,
    attempt: int,
    item: int | None,
    item_context: Mapping[str, Any],
) -> tuple[AssignmentRecord, str | None] | None:
    """The assignment for one try of one item (not yet queued) and the name of the
    action the task asked for (before ad-hoc actions resolve to their base), or None for
    an inline noop.

    The item's variables are visible to the task's expressions (action, input, target).
    """
    task_spec = step.spec.task(task.name)
    data = {**task.in_context, **item_context}
    if task_spec.runs_noop:
        if item is None:
            # Run inline, and recorded as an action execution done at once (Mistral runs
            # std.noop for such a task), so that the task's history reads the same.
            done = AssignmentRecord(
                id=assignment_id(task, None, attempt), task_id=task.id,
                execution_id=task.execution_id, task_name=task.name, action=NOOP_ACTION,
                input={}, attempt=attempt, state=AssignmentState.DONE, created_at=step.now,
                outcome=Outcome.success(None),
            )  # fmt: skip
            step.put_assignment(done)
            step.put_task(step.current(task), action=NOOP_ACTION, attempt=attempt,
                          assignment_id=done.id)  # fmt: skip
            step.followups.append(TaskFinished(task.id, Outcome.success(None), step.now))
            return None
        step.put_task(step.current(task), action=NOOP_ACTION)
    target = None if task_spec.target is None else step.evaluate(task_spec.target, data, task)
    action_input = _action_input(step, task, task_spec, data)
    if task_spec.workflow is not None:
        name = step.evaluate(task_spec.workflow, data, task)
        if not isinstance(name, str) or not name:
            raise TaskStartError(f"workflow name {name!r} is not a name")
        return AssignmentRecord(
            id=assignment_id(task, item, attempt), task_id=task.id,
            execution_id=task.execution_id, task_name=task.name, action=name,
            input=action_input, attempt=attempt, state=AssignmentState.CHILD,
            created_at=step.now, item=item,
        ), step.current(task).action  # fmt: skip
    action = NOOP_ACTION if task_spec.runs_noop else step.evaluate(task_spec.action, data, task)
    if not isinstance(action, str) or not action:
        raise TaskStartError(f"action name {action!r} is not a name")
    base, base_input = resolve_adhoc(step, action, action_input)
    deadline = step.current(task).runtime.get("deadline")
    return AssignmentRecord(
        id=assignment_id(task, item, attempt), task_id=task.id, execution_id=task.execution_id,
        task_name=task.name, action=base, input=base_input, attempt=attempt,
        state=AssignmentState.QUEUED, created_at=step.now, item=item,
        target=None if target is None else str(target),
        deadline=None if deadline is None else float(deadline),
    ), action  # fmt: skip


def release(step: Step, assignment: AssignmentRecord) -> None:
    """Hand an assignment on: queue it for a worker, or start its child execution."""
    if step.spec.task(assignment.task_name).workflow is not None:
        child = replace(assignment, state=AssignmentState.CHILD)
        step.put_assignment(child)
        step.commands.append(StartChildExecution(
            execution_id=ExecutionId(child.id), parent_task_id=child.task_id, item=child.item,
            workflow=child.action,
            input=child.input, params={"env": dict(step.execution.env)},
        ))  # fmt: skip
        return
    if step.execution.state == ExecutionState.PAUSED:
        step.put_assignment(replace(assignment, state=AssignmentState.PAUSED))
        return
    queued = assignment
    if queued.state != AssignmentState.QUEUED:
        queued = replace(assignment, state=AssignmentState.QUEUED)
    step.put_assignment(queued)
    step.commands.append(DispatchAssignment(queued))


def _action_input(
    step: Step, task: TaskRecord, task_spec: TaskSpec, data: Mapping[str, Any]
) -> dict[str, Any]:
    action_input: dict[str, Any] = {}
    if task_spec.input_expression is not None:
        value = step.evaluate(task_spec.input_expression, data, task)
        if not isinstance(value, Mapping):
            raise TaskStartError(
                f"input must evaluate to a mapping, got {type(value).__name__} {value!r}"
            )
        action_input.update(value)
    action_input.update(step.evaluate(dict(task_spec.input), data, task))
    return action_input


def adhoc_chain(step: Step, action: str) -> list[ActionSpec]:
    """The ad-hoc actions from ``action`` down to a base action, outermost first."""
    chain: list[ActionSpec] = []
    name = action
    while True:
        resolved = step.spec.resolve_name(name, step.spec.actions)
        adhoc = step.spec.actions.get(resolved)
        if adhoc is None:
            return chain
        chain.append(adhoc)
        if len(chain) > MAX_ADHOC_DEPTH:
            raise TaskStartError(f"ad-hoc action '{action}' nests deeper than {MAX_ADHOC_DEPTH}")
        name = adhoc.base


def resolve_adhoc(step: Step, action: str, given: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Turn an ad-hoc action and its input into the base action and the base's input."""
    chain = adhoc_chain(step, action)
    current: dict[str, Any] = dict(given)
    for adhoc in chain:
        declared = {p.name for p in adhoc.input}
        missing = [p.name for p in adhoc.input if not p.has_default and p.name not in current]
        unexpected = sorted(k for k in current if k not in declared) if adhoc.input else []
        if missing or unexpected:
            parts = [f"missing={missing}"] if missing else []
            parts += [f"unexpected={unexpected}"] if unexpected else []
            raise TaskStartError(f"Invalid input [name={adhoc.name}, {', '.join(parts)}]")
        bound = {p.name: current.get(p.name, p.default) for p in adhoc.input}
        if not adhoc.input:
            bound = current
        try:
            current = dict(step.evaluate(dict(adhoc.base_input), bound, None))
        except ExpressionError as e:
            raise TaskStartError(f"ad-hoc action '{adhoc.name}': {e}") from e
    base = chain[-1].base if chain else action
    return base, current


def apply_adhoc_output(step: Step, action: str | None, result: Any) -> Any:
    """Apply the ad-hoc actions' output transforms to a base result, innermost first."""
    if action is None:
        return result
    for adhoc in reversed(adhoc_chain(step, action)):
        if adhoc.output is not None:
            result = step.evaluate_raw(adhoc.output, result)
    return result

