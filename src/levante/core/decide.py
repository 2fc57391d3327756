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

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, assert_never

from levante.core.model import (
    AssignmentCompleted,
    AssignmentRecord,
    AssignmentState,
    CancelQueuedAssignments,
    Command,
    Decision,
    DispatchAssignment,
    Event,
    ExecutionDrained,
    ExecutionRecord,
    ExecutionStarted,
    ExecutionState,
    Outcome,
    Snapshot,
    TaskFinished,
    TaskRecord,
    TaskState,
)
from levante.errors import ExpressionError, InvalidInputError
from levante.ids import AssignmentId, task_id_for
from levante.lang import expressions
from levante.lang.spec import Transition, TransitionClause, WorkflowSpec

NOOP_ACTION = "std.noop"


# ---------------------------------------------------------------- public functions


def bind_input(spec: WorkflowSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The workflow input with defaults filled in; InvalidInputError names what is off.

    Defaults may be expressions over the input given so far (Mistral allows it).
    """
    declared = {p.name for p in spec.input}
    unexpected = sorted(k for k in given if k not in declared)
    missing = sorted(p.name for p in spec.input if not p.has_default and p.name not in given)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing={missing}")
        if unexpected:
            parts.append(f"unexpected={unexpected}")
        raise InvalidInputError(
            f"Invalid input for workflow '{spec.name}': {', '.join(parts)}"
            f" (declared: {[p.name for p in spec.input]})"
        )
    bound: dict[str, Any] = {}
    for p in spec.input:
        # Mistral copies defaults as written, without evaluating them.
        bound[p.name] = given.get(p.name, p.default)
    return bound


def decide(spec: WorkflowSpec, snapshot: Snapshot | None, event: Event) -> Decision:
    """The one transition function. ``snapshot`` is None only for ExecutionStarted."""
    match event:
        case ExecutionStarted():
            return _start(spec, event)
        case AssignmentCompleted():
            assert snapshot is not None
            step = _Step(spec, snapshot, event.now)
            step.complete_assignment(event)
            return step.decision()
        case TaskFinished():
            assert snapshot is not None
            step = _Step(spec, snapshot, event.now)
            task = snapshot.task
            assert task is not None and task.id == event.task_id
            step.finish_task(task, event.outcome, event.state_info)
            return step.decision()
        case ExecutionDrained():
            assert snapshot is not None
            step = _Step(spec, snapshot, event.now)
            step.fail_stranded_joins()
            return step.decision()
        case _:
            assert_never(event)


def error_message(error: Any) -> str:
    """A one-line description of an error value as workers report it."""
    if isinstance(error, Mapping):
        message = error.get("message")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) and kind else message
    if isinstance(error, str):
        return error
    return json.dumps(error, sort_keys=True, default=str)


def merge_contexts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge as Mistral does: nested mappings merge, anything else is replaced."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = merge_contexts(old, value)
        else:
            merged[key] = value
    return merged


def task_view(task: TaskRecord) -> dict[str, Any]:
    """What ``task('name')`` shows an expression."""
    return {
        "id": task.id,
        "name": task.name,
        "state": task.state.value,
        "state_info": task.state_info,
        "result": task.result,
        "published": dict(task.published),
    }


# ---------------------------------------------------------------- start


def _start(spec: WorkflowSpec, event: ExecutionStarted) -> Decision:
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
    )
    step = _Step(spec, Snapshot(execution=execution), event.now)
    try:
        variables = step.evaluate(dict(spec.vars), {}, None)
    except ExpressionError as e:
        step.end_execution(ExecutionState.ERROR, f"Failed to evaluate workflow vars: {e}")
        return step.decision()
    step.update_execution(context=variables)
    if spec.type != "direct":
        step.end_execution(
            ExecutionState.ERROR, f"workflow type '{spec.type}' is not supported by this engine"
        )
        return step.decision()
    for name in spec.start_task_names():
        step.schedule(name, {}, arrived_from=None)
    step.finish_execution_if_done()
    return step.decision()


# ---------------------------------------------------------------- the step builder


class _Step:
    """Mutable scratch space for one decision; the result is frozen in decision()."""

    def __init__(self, spec: WorkflowSpec, snapshot: Snapshot, now: float) -> None:
        self.spec = spec
        self.execution = snapshot.execution
        self.now = now
        self.latest: dict[str, TaskRecord] = dict(snapshot.tasks)
        if snapshot.task is not None:
            self.latest.setdefault(snapshot.task.name, snapshot.task)
        self.snapshot = snapshot
        self.changed_tasks: dict[str, TaskRecord] = {}
        self.changed_assignments: dict[str, AssignmentRecord] = {}
        self.commands: list[Command] = []
        self.followups: list[Event] = []

    # -- bookkeeping

    def decision(self) -> Decision:
        return Decision(
            execution=self.execution,
            tasks=tuple(self.changed_tasks.values()),
            assignments=tuple(self.changed_assignments.values()),
            commands=tuple(self.commands),
            followups=tuple(self.followups),
        )

    def put_task(self, task: TaskRecord) -> TaskRecord:
        task = replace(task, updated_at=self.now)
        self.changed_tasks[task.id] = task
        latest = self.latest.get(task.name)
        if latest is None or latest.seq <= task.seq:
            self.latest[task.name] = task
        return task

    def put_assignment(self, assignment: AssignmentRecord) -> None:
        self.changed_assignments[assignment.id] = assignment

    def update_execution(self, **changes: Any) -> None:
        self.execution = replace(self.execution, updated_at=self.now, **changes)

    # -- expressions

    def expression_context(
        self, data: Mapping[str, Any], current: TaskRecord | None = None
    ) -> dict[str, Any]:
        """What ``$`` (YAQL) and ``_`` (Jinja) see: input < vars < the task's context."""
        context: dict[str, Any] = {**self.execution.input, **self.execution.context, **data}
        context["__env"] = dict(self.execution.env)
        context["__execution"] = self.execution_view()
        if current is not None:
            context["__task_execution"] = {"id": current.id, "name": current.name}
        return context

    def execution_view(self) -> dict[str, Any]:
        ex = self.execution
        return {
            "id": ex.id,
            "name": ex.workflow,
            "input": dict(ex.input),
            "params": dict(ex.params),
            "state": ex.state.value,
            "created_at": ex.created_at,
        }

    def host(self, current: TaskRecord | None) -> _Host:
        return _Host(self, current)

    def evaluate(self, value: Any, data: Mapping[str, Any], current: TaskRecord | None) -> Any:
        return expressions.evaluate(
            value, self.expression_context(data, current), self.host(current)
        )

    # -- tasks

    def schedule(self, name: str, context: Mapping[str, Any], arrived_from: str | None) -> None:
        """A transition (or the start) reached task ``name`` with ``context``."""
        task_spec = self.spec.task(name)
        if task_spec.join is not None and arrived_from is not None:
            self._arrive_at_join(name, context, arrived_from)
            return
        task = self._new_task(name, TaskState.RUNNING, context)
        self.update_execution(active_tasks=self.execution.active_tasks + 1)
        self._run(task)

    def _new_task(self, name: str, state: TaskState, context: Mapping[str, Any]) -> TaskRecord:
        seq = self.execution.next_seq
        self.update_execution(next_seq=seq + 1)
        return self.put_task(
            TaskRecord(
                id=task_id_for(self.execution.id, seq),
                execution_id=self.execution.id,
                name=name,
                seq=seq,
                state=state,
                in_context=dict(context),
                created_at=self.now,
                updated_at=self.now,
            )
        )

    def _arrive_at_join(self, name: str, context: Mapping[str, Any], arrived_from: str) -> None:
        task_spec = self.spec.task(name)
        latest = self.latest.get(name)
        if latest is not None and latest.state == TaskState.WAITING:
            waiting = latest
        else:
            waiting = self._new_task(name, TaskState.WAITING, {})
            self.update_execution(waiting_tasks=self.execution.waiting_tasks + 1)
        arrivals = (*waiting.arrivals, arrived_from)
        waiting = replace(
            waiting, arrivals=arrivals, in_context=merge_contexts(waiting.in_context, context)
        )
        inbound = self.spec.inbound_task_names(name)
        if task_spec.join == "all":
            needed = len(inbound)
        elif task_spec.join == "one":
            needed = 1
        else:
            assert isinstance(task_spec.join, int)
            needed = task_spec.join
        if len(set(arrivals)) < needed:
            self.put_task(waiting)
            return
        self.update_execution(
            waiting_tasks=self.execution.waiting_tasks - 1,
            active_tasks=self.execution.active_tasks + 1,
        )
        self._run(self.put_task(replace(waiting, state=TaskState.RUNNING)))

    def _run(self, task: TaskRecord) -> None:
        """Evaluate the task's action and input and queue its assignment."""
        task_spec = self.spec.task(task.name)
        if task_spec.workflow is not None:
            self.followups.append(
                TaskFinished(
                    task.id,
                    Outcome.failure(
                        {
                            "type": "NotSupported",
                            "message": "workflow tasks (subworkflows) are not supported yet",
                        }
                    ),
                    self.now,
                )
            )
            return
        try:
            action = NOOP_ACTION if task_spec.runs_noop else self.evaluate(
                task_spec.action, task.in_context, task
            )
            action_input = self._action_input(task)
            if not isinstance(action, str) or not action:
                raise ExpressionError(f"action name {action!r} is not a name")
        except ExpressionError as e:
            self._fail_task_and_execution(task, f"Failed to run task [error={e}, "
                                          f"wf={self.spec.name}, task={task.name}]")  # fmt: skip
            return
        if task_spec.runs_noop:
            self.put_task(replace(task, action=NOOP_ACTION))
            self.followups.append(TaskFinished(task.id, Outcome.success(None), self.now))
            return
        assignment = AssignmentRecord(
            id=AssignmentId(task.id),
            task_id=task.id,
            execution_id=task.execution_id,
            task_name=task.name,
            action=action,
            input=action_input,
            attempt=task.attempt + 1,
            state=AssignmentState.QUEUED,
            created_at=self.now,
        )
        self.put_task(
            replace(task, action=action, attempt=assignment.attempt, assignment_id=assignment.id)
        )
        self.put_assignment(assignment)
        self.commands.append(DispatchAssignment(assignment))

    def _action_input(self, task: TaskRecord) -> dict[str, Any]:
        """The task's ``input`` (a mapping, or one expression giving a mapping) evaluated."""
        task_spec = self.spec.task(task.name)
        action_input: dict[str, Any] = {}
        if task_spec.input_expression is not None:
            value = self.evaluate(task_spec.input_expression, task.in_context, task)
            if not isinstance(value, Mapping):
                raise ExpressionError(
                    f"task '{task.name}': input must evaluate to a mapping, "
                    f"got {type(value).__name__}"
                )
            action_input.update(value)
        action_input.update(self.evaluate(dict(task_spec.input), task.in_context, task))
        return action_input

    # -- outcomes

    def complete_assignment(self, event: AssignmentCompleted) -> None:
        assignment = self.snapshot.assignment
        task = self.snapshot.task
        assert assignment is not None and task is not None
        self.put_assignment(
            replace(assignment, state=AssignmentState.DONE, outcome=event.outcome, worker_id=None,
                    lease_expires_at=None)
        )
        if task.state.is_final:
            return
        self.finish_task(task, event.outcome, "")

    def finish_task(self, task: TaskRecord, outcome: Outcome, state_info: str) -> None:
        if task.state.is_final:
            return
        task_spec = self.spec.task(task.name)
        state = TaskState.SUCCESS if outcome.ok else TaskState.ERROR
        if not outcome.ok:
            state_info = state_info or error_message(outcome.value)
        task = self.put_task(
            replace(task, result=outcome.value, state=state, state_info=state_info)
        )
        self.update_execution(active_tasks=self.execution.active_tasks - 1)
        if self.execution.state != ExecutionState.RUNNING:
            return  # the execution ended (fail, succeed...): record the outcome, start nothing
        try:
            block = task_spec.publish if outcome.ok else task_spec.publish_on_error
            published = self.evaluate(dict(block), task.in_context, task) if block else {}
            task = self.put_task(replace(task, published=dict(published)))
            outbound = {**task.in_context, **published}
            commands = self._commands(task, outcome.ok, outbound)
        except ExpressionError as e:
            self._fail_task_and_execution(
                task,
                f"Failed to handle action completion [error={e}, wf={self.spec.name}, "
                f"task={task.name}, action={task.action}]",
            )
            return
        handled = outcome.ok or any(from_on_error for _, _, from_on_error in commands)
        took_task = False
        for transition, params, _ in commands:
            if not transition.is_engine_command:
                self.schedule(transition.target, outbound, arrived_from=task.name)
                took_task = True
            elif self._run_engine_command(transition.target, params, task):
                break
        if not handled:
            self._record_unhandled_error(task)
        if took_task:
            self.put_task(replace(self.latest_by_id(task), has_next=True))
        else:
            self.update_execution(
                final_context=merge_contexts(self.execution.final_context, outbound)
            )
        self.finish_execution_if_done()

    def latest_by_id(self, task: TaskRecord) -> TaskRecord:
        return self.changed_tasks.get(task.id, task)

    def _commands(
        self, task: TaskRecord, ok: bool, outbound: Mapping[str, Any]
    ) -> list[tuple[Transition, dict[str, Any], bool]]:
        """Every transition whose condition holds, in order, with its evaluated params.

        Each entry says whether it came from on-error. All conditions are evaluated
        before any is acted on, so a failing expression changes nothing else.
        """
        task_spec = self.spec.task(task.name)
        clauses: tuple[tuple[TransitionClause | None, bool], ...] = (
            (task_spec.on_success, False) if ok else (task_spec.on_error, True),
            (task_spec.on_complete, False),
        )
        commands: list[tuple[Transition, dict[str, Any], bool]] = []
        for clause, from_on_error in clauses:
            if clause is None:
                continue
            for transition in clause.transitions:
                if transition.condition is not None and not self.evaluate(
                    transition.condition, outbound, task
                ):
                    continue
                params = self.evaluate(dict(transition.params), outbound, task)
                commands.append((transition, params, from_on_error))
        return commands

    def _run_engine_command(self, command: str, params: Mapping[str, Any], task: TaskRecord
                            ) -> bool:  # fmt: skip
        """Carry out fail / succeed / pause / noop; True when the rest must be dropped."""
        msg = params.get("msg")
        message = msg if isinstance(msg, str) else ("" if msg is None else json.dumps(msg))
        match command:
            case "noop":
                return False
            case "fail":
                self.end_execution(ExecutionState.ERROR, message)
                return True
            case "succeed":
                self.end_execution(ExecutionState.SUCCESS, message)
                return True
            case "pause":
                self.update_execution(state=ExecutionState.PAUSED, state_info=message)
                return True
            case other:
                raise AssertionError(f"unknown engine command {other}")

    def _fail_task_and_execution(self, task: TaskRecord, message: str) -> None:
        """An expression failed around a task: the task and the execution end in ERROR."""
        current = self.latest_by_id(task)
        if not current.state.is_final:
            self.update_execution(active_tasks=self.execution.active_tasks - 1)
        self.put_task(replace(current, state=TaskState.ERROR, state_info=message))
        self.end_execution(ExecutionState.ERROR, message)

    def _record_unhandled_error(self, task: TaskRecord) -> None:
        self.update_execution(errors=(*self.execution.errors, f"{task.name}\t{task.id}\t"
                                      f"{task.state_info}"))  # fmt: skip

    # -- the execution's end

    def fail_stranded_joins(self) -> None:
        """Nothing runs: each waiting join can never fire, so it ends in ERROR."""
        if self.execution.state != ExecutionState.RUNNING:
            return
        for task in list(self.latest.values()):
            if task.state != TaskState.WAITING:
                continue
            inbound = self.spec.inbound_task_names(task.name)
            missing = [n for n in inbound if n not in task.arrivals]
            failed = self.put_task(
                replace(
                    task,
                    state=TaskState.ERROR,
                    state_info=f"Failed by tasks: {missing} (no route left to this join)",
                )
            )
            self._record_unhandled_error(failed)
        self.update_execution(waiting_tasks=0)
        self.finish_execution_if_done()

    def finish_execution_if_done(self) -> None:
        ex = self.execution
        if ex.state != ExecutionState.RUNNING or ex.active_tasks > 0:
            return
        if ex.waiting_tasks > 0:
            self.followups.append(ExecutionDrained(ex.id, self.now))
            return
        if not ex.errors:
            self.end_execution(ExecutionState.SUCCESS, "")
            return
        failed = [e.split("\t", 2) for e in ex.errors]
        self.end_execution(
            ExecutionState.ERROR,
            "Failure caused by error in tasks: "
            + ", ".join(name for name, _, _ in failed)
            + "\n"
            + "".join(f"\n  {name} [task_ex_id={tid}] -> {info}\n" for name, tid, info in failed),
        )

    def end_execution(self, state: ExecutionState, state_info: str) -> None:
        final = self.execution.final_context
        output: Any
        try:
            if state == ExecutionState.SUCCESS:
                output = (
                    dict(final)
                    if self.spec.output is None
                    else self.evaluate(self.spec.output, final, None)
                )
            else:
                on_error = (
                    dict(final)
                    if self.spec.output_on_error is None
                    else self.evaluate(self.spec.output_on_error, final, None)
                )
                output = merge_contexts({"result": state_info}, on_error)
        except ExpressionError as e:
            state = ExecutionState.ERROR
            state_info = f"Failed to evaluate the workflow output: {e}"
            output = {"result": state_info}
        self.update_execution(state=state, state_info=state_info, output=output)
        self.commands.append(CancelQueuedAssignments(self.execution.id))


class _Host:
    """What expressions may ask about: tasks by name, the execution, its env."""

    def __init__(self, step: _Step, current: TaskRecord | None) -> None:
        self._step = step
        self._current = current

    def task(self, name: str | None) -> Mapping[str, Any] | None:
        current = self._current
        if current is not None and (name is None or name == current.name):
            return task_view(current)
        if name is None:
            return None
        task = self._step.latest.get(name)
        return None if task is None else task_view(task)

    def execution(self) -> Mapping[str, Any]:
        return self._step.execution_view()

    def env(self) -> Mapping[str, Any]:
        return dict(self._step.execution.env)

    def global_var(self, name: str) -> Any:
        return self._step.execution.context.get(name)
