"""Finishing tasks: outcomes, retries, fail-on, wait-after, publish, transitions, timers.

Rules (Mistral's):
- An outcome passes through the ad-hoc action's output, then fail-on, then retry
  (count, delay, break-on, continue-on), then wait-after; only then is the task
  finished: published, and its transitions taken.
- with-items: each item's assignment retries on its own; when every item has an
  outcome the task's result is the list of results in item order, and it failed if
  any item failed.
- Published data: on-success/on-error clause publish < the task's publish block <
  on-complete clause publish; ``global`` publishing merges into the execution's vars.
- A finished task's commands are the on-success (or on-error) entries whose condition
  holds, then the on-complete ones; the first fail / succeed / pause drops the rest.
  An error is handled when its on-error clause produced a command.
- An expression failing while a completion is handled, or a policy value of the wrong
  type, fails the task and the execution at once (no on-error), as in Mistral.
- Reverse workflows: a successful task lets the tasks that require it start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from levante.core.model import (
    AssignmentCompleted,
    AssignmentRecord,
    AssignmentState,
    CancelTimer,
    ExecutionState,
    FailTaskAssignments,
    ItemsSettled,
    LeaseExpired,
    Outcome,
    PauseAssignments,
    StartTimer,
    TaskRecord,
    TaskState,
    TimerFired,
    TimerRecord,
    VoidAssignment,
    replace,
)
from levante.core.running import (
    TaskStartError,
    apply_adhoc_output,
    assignment_id,
    fail_to_start,
    force_fail,
    policy_count,
    policy_seconds,
    release,
    schedule,
    start,
)
from levante.core.step import (
    Step,
    error_message,
    merge_by_version,
    merge_contexts,
    outbound_context,
)
from levante.errors import ExpressionError
from levante.lang.spec import Transition, TransitionClause

# ---------------------------------------------------------------- assignment outcomes


def complete_assignment(step: Step, event: AssignmentCompleted) -> None:
    assignment = step.snapshot.assignment
    task = step.snapshot.task
    assert assignment is not None and task is not None
    step.put_assignment(replace(assignment, state=AssignmentState.DONE, outcome=event.outcome,
                                worker_id=None, lease_expires_at=None))  # fmt: skip
    if task.state.is_final or task.state == TaskState.RUNNING_DELAYED:
        return  # finished already (timeout, the execution ended) or waiting after a retry
    if assignment.item is None and task.assignment_id != assignment.id:
        return  # an attempt that a retry superseded
    try:
        outcome = _transformed(step, task, event.outcome)
        if assignment.item is not None:
            _item_done(step, task, assignment, outcome)
        else:
            settle(step, task, outcome, assignment)
    except (ExpressionError, TaskStartError) as e:
        fail_handling(step, task, e)


def _transformed(step: Step, task: TaskRecord, outcome: Outcome) -> Outcome:
    """Apply the ad-hoc action's output transform to a successful result."""
    if not outcome.ok or step.spec.task(task.name).workflow is not None:
        return outcome
    return Outcome.success(apply_adhoc_output(step, task.action, outcome.value))


def _item_done(
    step: Step, task: TaskRecord, assignment: AssignmentRecord, outcome: Outcome
) -> None:
    if _retry(step, task, outcome, assignment):
        return
    runtime = dict(step.current(task).runtime)
    runtime["done"] = int(runtime.get("done", 0)) + 1
    held = [a for a in step.snapshot.assignments if a.state == AssignmentState.HELD]
    if held and int(runtime["started"]) < int(runtime["items"]):
        runtime["started"] = int(runtime["started"]) + 1
        release(step, held[0])
    step.put_task(step.current(task), runtime=runtime)
    if runtime["done"] >= runtime["items"]:
        step.followups.append(ItemsSettled(task.id, step.now))


def items_settled(step: Step, event: ItemsSettled) -> None:
    """Every item has an outcome: the task's result is the list of them, in item order."""
    task = step.snapshot.task
    assert task is not None
    if task.state.is_final:
        return
    latest: dict[int, AssignmentRecord] = {}
    for a in step.snapshot.assignments:
        newer = a.item is not None and (a.item not in latest or a.attempt > latest[a.item].attempt)
        if newer and a.outcome is not None:
            assert a.item is not None
            latest[a.item] = a
    results: list[Any] = []
    failure: Outcome | None = None
    try:
        for index in sorted(latest):
            outcome = _transformed(step, task, latest[index].outcome or Outcome.success())
            results.append(outcome.value)
            if not outcome.ok and failure is None:
                failure = outcome
        if failure is not None:
            finish_task(step, task, Outcome.failure(results), error_message(failure.value))
            return
        settle(step, task, Outcome.success(results), None, items=latest)
    except (ExpressionError, TaskStartError) as e:
        fail_handling(step, task, e)


def settle(
    step: Step,
    task: TaskRecord,
    outcome: Outcome,
    assignment: AssignmentRecord | None,
    *,
    items: Mapping[int, AssignmentRecord] | None = None,
) -> None:
    """fail-on, retry and wait-after, then finish the task.

    For a with-items task (``items``: each item's last try) a retry runs every item again.
    """
    task_spec = step.spec.task(task.name)
    if outcome.ok and task_spec.policies.fail_on is not None:
        judged = replace(task, result=outcome.value, state=TaskState.SUCCESS)
        if step.evaluate(task_spec.policies.fail_on, task.in_context, judged):
            outcome = Outcome.failure(outcome.value)
            task = step.put_task(step.current(task), runtime={
                **step.current(task).runtime, "state_info": "Failed by fail-on policy"})
    if assignment is not None and _retry(step, task, outcome, assignment):
        return
    if items is not None and not outcome.ok and _retry_items(step, task, outcome, items):
        return
    wait_after = task_spec.policies.wait_after
    if wait_after is not None and not step.current(task).runtime.get("waited_after"):
        delay = policy_seconds("wait-after", step.evaluate(wait_after, task.in_context, task))
        if delay > 0:
            current = step.current(task)
            step.put_task(current, state=TaskState.RUNNING_DELAYED, runtime={
                **current.runtime, "waited_after": True,
                "pending": {"ok": outcome.ok, "value": outcome.value}})  # fmt: skip
            step.commands.append(StartTimer(TimerRecord(
                id=f"{task.id}:wait-after", execution_id=task.execution_id,
                kind="wait-after", due_at=step.now + delay, task_id=task.id,
            )))  # fmt: skip
            return
    finish_task(step, step.current(task), outcome, step.current(task).runtime.get("state_info", ""))


def _retry(
    step: Step, task: TaskRecord, outcome: Outcome, assignment: AssignmentRecord
) -> bool:
    """Start another attempt if the retry policy says so; True when it did."""
    retry = step.spec.task(task.name).policies.retry
    if retry is None:
        return False
    current = step.current(task)
    judged = replace(current, result=outcome.value,
                     state=TaskState.SUCCESS if outcome.ok else TaskState.ERROR)  # fmt: skip
    data = _with_own_publish(step, judged, outcome.ok)
    count = policy_count("retry count", step.evaluate(retry.count, data, judged))
    key = "retry_no" if assignment.item is None else f"retry_no:{assignment.item}"
    retry_no = int(current.runtime.get(key, 0))
    if retry_no >= count:
        return False
    breaks = retry.break_on is not None and not outcome.ok
    if breaks and step.evaluate(retry.break_on, data, judged):
        return False
    if retry.continue_on is None:
        if outcome.ok:
            return False
    elif not step.evaluate(retry.continue_on, data, judged):
        return False
    delay = policy_seconds("retry delay", step.evaluate(retry.delay, data, judged))
    runtime = {**current.runtime, key: retry_no + 1}
    if assignment.item is None:
        runtime["retry_no"] = retry_no + 1
    if delay > 0:
        if assignment.item is None:
            current = replace(current, state=TaskState.RUNNING_DELAYED)
        step.put_task(current, runtime=runtime)
        step.commands.append(StartTimer(TimerRecord(
            id=f"{assignment.id}:retry", execution_id=task.execution_id, kind="retry",
            due_at=step.now + delay, task_id=task.id, payload={"assignment_id": assignment.id},
        )))  # fmt: skip
        return True
    step.put_task(current, runtime=runtime)
    _next_attempt(step, step.current(task), assignment)
    return True


def _retry_items(
    step: Step, task: TaskRecord, outcome: Outcome, items: Mapping[int, AssignmentRecord]
) -> bool:
    """A with-items task failed as a whole (fail-on): run all of its items again."""
    retry = step.spec.task(task.name).policies.retry
    if retry is None:
        return False
    current = step.current(task)
    judged = replace(current, result=outcome.value, state=TaskState.ERROR)
    data = _with_own_publish(step, judged, False)
    retry_no = int(current.runtime.get("retry_no", 0))
    if retry_no >= policy_count("retry count", step.evaluate(retry.count, data, judged)):
        return False
    if retry.break_on is not None and step.evaluate(retry.break_on, data, judged):
        return False
    if retry.continue_on is not None and not step.evaluate(retry.continue_on, data, judged):
        return False
    attempt = current.attempt + 1
    count = len(items)
    concurrency = policy_count(
        "concurrency", step.evaluate(step.spec.task(task.name).policies.concurrency, data, judged)
    )
    limit = count if not concurrency else min(count, concurrency)
    runtime = {**current.runtime, "retry_no": retry_no + 1, "items": count, "started": limit,
               "done": 0}  # fmt: skip
    step.put_task(current, state=TaskState.RUNNING, attempt=attempt, runtime=runtime)
    for index in sorted(items):
        previous = items[index]
        again = replace(previous, id=assignment_id(task, index, attempt), attempt=attempt,
                        outcome=None, worker_id=None, lease_expires_at=None,
                        created_at=step.now)  # fmt: skip
        if index < limit:
            release(step, again)
        else:
            step.put_assignment(replace(again, state=AssignmentState.HELD))
    return True


def _with_own_publish(step: Step, task: TaskRecord, ok: bool) -> dict[str, Any]:
    """Mistral evaluates retry's conditions over the task's outbound context."""
    try:
        published, _ = _publish(step, task, ok)
    except ExpressionError:
        published = {}
    return {**task.in_context, **published}


def _next_attempt(step: Step, task: TaskRecord, previous: AssignmentRecord) -> None:
    attempt = previous.attempt + 1
    again = replace(
        previous, id=assignment_id(task, previous.item, attempt), attempt=attempt,
        outcome=None, worker_id=None, lease_expires_at=None, created_at=step.now,
    )  # fmt: skip
    if previous.item is None:
        step.put_task(task, state=TaskState.RUNNING, attempt=attempt,
                      assignment_id=again.id)  # fmt: skip
    release(step, again)


def lease_expired(step: Step, event: LeaseExpired) -> None:
    """The holder went silent: the attempt is superseded by a new one (not a retry)."""
    assignment = step.snapshot.assignment
    task = step.snapshot.task
    if assignment is None or task is None or assignment.state != AssignmentState.LEASED:
        return
    step.put_assignment(replace(assignment, state=AssignmentState.CANCELLED, worker_id=None,
                                lease_expires_at=None))  # fmt: skip
    step.commands.append(VoidAssignment(assignment.id, "its lease ran out"))
    if task.state.is_final or (assignment.item is None and task.assignment_id != assignment.id):
        return
    _next_attempt(step, task, assignment)


# ---------------------------------------------------------------- timers


def timer_fired(step: Step, event: TimerFired) -> None:
    task = step.snapshot.task
    timer = event.timer
    if step.execution.state == ExecutionState.PAUSED:
        step.add_backlog({"kind": "timer", "timer": {
            "id": timer.id, "execution_id": timer.execution_id, "kind": timer.kind,
            "task_id": timer.task_id, "payload": dict(timer.payload)}})  # fmt: skip
        return
    if task is None or task.state.is_final or not step.running:
        return
    try:
        match timer.kind:
            case "wait-before":
                if task.state == TaskState.RUNNING_DELAYED:
                    start(step, step.put_task(task, state=TaskState.RUNNING))
            case "retry":
                previous = step.snapshot.assignment
                if previous is not None:
                    _next_attempt(step, task, previous)
            case "wait-after":
                pending = task.runtime.get("pending")
                if task.state == TaskState.RUNNING_DELAYED and isinstance(pending, Mapping):
                    outcome = Outcome(bool(pending["ok"]), pending.get("value"))
                    finish_task(step, task, outcome, task.runtime.get("state_info", ""))
            case "timeout":
                seconds = timer.payload.get("seconds")
                error = {"type": "TimeoutError",
                         "message": f"Task timed out after {seconds} seconds"}  # fmt: skip
                step.commands.append(FailTaskAssignments(task.id, error))
                finish_task(step, task, Outcome.failure(error),
                            f"Task timed out [timeout={seconds}s]")  # fmt: skip
            case other:
                raise AssertionError(f"unknown timer kind {other}")
    except (ExpressionError, TaskStartError) as e:
        fail_handling(step, task, e)


# ---------------------------------------------------------------- finishing


def fail_handling(step: Step, task: TaskRecord, error: Exception) -> None:
    """An expression failed while handling a completion: task and execution end in ERROR."""
    message = (
        f"Failed to handle action completion [error={error}, wf={step.spec.name}, "
        f"task={task.name}, action={task.action}]"
    )
    force_fail(step, step.current(task), message)


def finish_task(step: Step, task: TaskRecord, outcome: Outcome, state_info: str = "") -> None:
    """Record the outcome, publish, and take the transitions (later, if paused)."""
    task = step.current(task)
    if task.state.is_final:
        return
    task_spec = step.spec.task(task.name)
    if not outcome.ok:
        state_info = state_info or error_message(outcome.value)
    task = step.put_task(task, result=outcome.value,
                         state_info="" if outcome.ok else state_info,
                         state=TaskState.SUCCESS if outcome.ok else TaskState.ERROR)
    step.update_execution(active_tasks=step.execution.active_tasks - 1)
    if task.runtime.get("deadline") is not None:  # a timeout timer was started
        step.commands.append(CancelTimer(f"{task.id}:timeout"))
    if step.execution.state.is_final:
        return  # the execution ended (fail, succeed...): record the outcome, start nothing
    try:
        published, globals_ = _publish(step, task, outcome.ok)
        if published != task.published:
            task = step.put_task(task, published=published)
        if globals_:
            step.update_execution(context=merge_contexts(step.execution.context, globals_))
        keep = task_spec.keep_result
        if keep is not True and not step.evaluate(keep, {**task.in_context, **published}, task):
            task = step.put_task(task, runtime={**task.runtime, "drop_result": True})
    except ExpressionError as e:
        fail_handling(step, task, e)
        return
    if step.execution.state == ExecutionState.PAUSED:
        # Mistral: a 'pause' among its commands is a no-op, the execution is paused already.
        step.add_backlog({"kind": "transitions", "task_id": task.id, "skip": 0,
                          "took_task": False, "ignore_pause": True})  # fmt: skip
        return
    take_transitions(step, task, skip=0, took_task=False)


def take_transitions(
    step: Step, task: TaskRecord, skip: int, took_task: bool, ignore_pause: bool = False
) -> None:
    """Take a finished task's transitions from the ``skip``-th on (after a pause)."""
    task = step.current(task)
    ok = task.state == TaskState.SUCCESS
    outbound = outbound_context(task.in_context, task.published)
    try:
        commands = _commands(step, task, ok, outbound)
    except ExpressionError as e:
        fail_handling(step, task, e)
        return
    if task.runtime.get("drop_result"):
        task = step.put_task(task, result=None)  # keep-result: false
    handled = ok or any(from_on_error for _, _, from_on_error in commands)
    ended_here = False
    for index, (transition, params, _) in enumerate(commands):
        if index < skip:
            continue
        if not transition.is_engine_command:
            schedule(step, transition.target, outbound, arrived_from=task.name)
            took_task = True
        elif transition.target == "pause" and ignore_pause:
            continue
        elif transition.target == "pause":
            step.update_execution(state=ExecutionState.PAUSED, state_info=_message(params))
            step.commands.append(PauseAssignments(step.execution.id))
            step.add_backlog({"kind": "transitions", "task_id": task.id, "skip": index + 1,
                              "took_task": took_task})  # fmt: skip
            return
        else:
            if transition.target in ("fail", "succeed") and not took_task:
                # Engine commands are not next tasks: this task is an end task, and its
                # context is in the final context that the output is evaluated over.
                step.update_execution(final_context=merge_by_version(
                    step.execution.final_context, outbound))  # fmt: skip
                ended_here = True
            if _engine_command(step, transition.target, params):
                break
    if not handled:
        step.record_unhandled_error(task)
    if took_task:
        step.put_task(step.current(task), has_next=True)
    elif not ended_here:
        step.update_execution(final_context=merge_by_version(step.execution.final_context,
                                                             outbound))  # fmt: skip
    step.finish_execution_if_done()


def _message(params: Mapping[str, Any]) -> str:
    msg = params.get("msg")
    return msg if isinstance(msg, str) else ("" if msg is None else json.dumps(msg))


def _publish(step: Step, task: TaskRecord, ok: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's published (branch) variables and its global ones."""
    task_spec = step.spec.task(task.name)
    clause = task_spec.on_success if ok else task_spec.on_error
    blocks: list[Mapping[str, Any]] = []
    globals_: list[Mapping[str, Any]] = []
    if clause is not None:
        blocks.append(clause.publish)
        globals_.append(clause.publish_global)
    blocks.append(task_spec.publish if ok else task_spec.publish_on_error)
    if task_spec.on_complete is not None:
        blocks.append(task_spec.on_complete.publish)
        globals_.append(task_spec.on_complete.publish_global)
    published: dict[str, Any] = {}
    for block in blocks:
        if block:
            published.update(step.evaluate(dict(block), task.in_context, task))
    global_vars: dict[str, Any] = {}
    for block in globals_:
        if block:
            global_vars = merge_contexts(
                global_vars, step.evaluate(dict(block), task.in_context, task)
            )
    return published, global_vars


def _commands(
    step: Step, task: TaskRecord, ok: bool, outbound: Mapping[str, Any]
) -> list[tuple[Transition, dict[str, Any], bool]]:
    """Every transition whose condition holds, in order, with its evaluated params.

    Each entry says whether it came from on-error. All conditions are evaluated
    before any is acted on, so a failing expression changes nothing else.
    """
    if step.spec.type == "reverse":
        if not ok:
            return []
        target = step.execution.params.get("task_name")
        needed = set(step.spec.required_closure(str(target)))
        return [
            (Transition(name), {}, False)
            for name in step.spec.dependent_task_names(task.name)
            if name in needed
        ]
    task_spec = step.spec.task(task.name)
    clauses: tuple[tuple[TransitionClause | None, bool], ...] = (
        (task_spec.on_success, False) if ok else (task_spec.on_error, True),
        (task_spec.on_complete, False),
    )
    commands: list[tuple[Transition, dict[str, Any], bool]] = []
    for clause, from_on_error in clauses:
        if clause is None:
            continue
        for transition in clause.transitions:
            if transition.condition is not None and not step.evaluate(
                transition.condition, outbound, task
            ):
                continue
            params = step.evaluate(dict(transition.params), outbound, task)
            commands.append((transition, params, from_on_error))
    return commands


def _engine_command(step: Step, command: str, params: Mapping[str, Any]) -> bool:
    """Carry out fail / succeed / noop; True when the rest must be dropped."""
    match command:
        case "noop":
            return False
        case "fail":
            step.end_execution(ExecutionState.ERROR, _message(params))
            return True
        case "succeed":
            step.end_execution(ExecutionState.SUCCESS, _message(params))
            return True
        case other:
            raise AssertionError(f"unknown engine command {other}")


def fail_stranded_joins(step: Step) -> None:
    """Nothing runs: each waiting join can never fire, so it fails like any task.

    Joins fail upstream first: a join waiting for another waiting join waits until that
    one has failed, since the failure may route into it (on-error) and let it fire.
    """
    while step.running:
        waiting = [t for t in step.latest.values() if t.state == TaskState.WAITING]
        if not waiting:
            break
        names = {t.name for t in waiting}

        def missing(task: TaskRecord) -> list[str]:
            inbound = step.spec.inbound_task_names(task.name)
            return [n for n in inbound if n not in task.arrivals]

        upstream_first = [t for t in waiting if not set(missing(t)) & names] or waiting
        task = min(upstream_first, key=lambda t: t.seq)
        step.update_execution(waiting_tasks=step.execution.waiting_tasks - 1,
                              active_tasks=step.execution.active_tasks + 1)  # fmt: skip
        running = step.put_task(task, state=TaskState.RUNNING)
        message = f"Failed by tasks: {missing(task)}"
        finish_task(step, running, Outcome.failure(message), message)
    step.finish_execution_if_done()


__all__ = [
    "complete_assignment",
    "fail_stranded_joins",
    "fail_to_start",
    "finish_task",
    "items_settled",
    "timer_fired",
]
