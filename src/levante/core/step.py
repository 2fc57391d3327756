"""The scratch space of one decision: the rows it changes, expressions, the end of runs.

A Step starts from a Snapshot and collects changed rows, commands and follow-up events;
``decision()`` freezes them. Everything here is pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from levante.core.model import (
    MAX_TASK_READS,
    AssignmentRecord,
    ChildExecutionEnded,
    Command,
    Decision,
    Event,
    ExecutionDrained,
    ExecutionState,
    HistoryEntry,
    Outcome,
    Snapshot,
    TaskRecord,
    TasksNeeded,
    TaskState,
    replace,
)
from levante.errors import ExpressionError
from levante.ids import ExecutionId, TaskId
from levante.lang import expressions
from levante.lang.spec import WorkflowSpec

WORKFLOW_TASK_TYPE: Final = "WORKFLOW"


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


VERSIONS = "__versions"  # per-key publish counters, as Mistral's context versioning keeps


def outbound_context(
    in_context: Mapping[str, Any], published: Mapping[str, Any]
) -> dict[str, Any]:
    """A task's inbound context updated with what it published (a shallow update).

    Each published key's version goes up by one, so that a join can tell a value a
    branch published from an older one it merely inherited.
    """
    out = {**in_context, **published}
    if published:
        versions = dict(in_context.get(VERSIONS) or {})
        for key in published:
            versions[key] = int(versions.get(key, 0)) + 1
        out[VERSIONS] = versions
    return out


def merge_by_version(base: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    """Merge two branches' contexts: new keys are added, nested mappings merge, and a
    value replaces another only if it was published more recently (higher version)."""
    if not base:
        return dict(incoming)
    base_versions = base.get(VERSIONS) or {}
    incoming_versions = incoming.get(VERSIONS) or {}
    merged = dict(base)
    for key, value in incoming.items():
        if key == VERSIONS:
            continue
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_contexts(merged[key], value)
        elif incoming_versions.get(key, 0) > base_versions.get(key, 0):
            merged[key] = value
    keys = set(base_versions) | set(incoming_versions)
    if keys:
        merged[VERSIONS] = {
            k: max(base_versions.get(k, 0), incoming_versions.get(k, 0)) for k in sorted(keys)
        }
    return merged


def without_versions(context: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in context.items() if k != VERSIONS}


def error_message(error: Any) -> str:
    """A one-line description of an error value as workers report it."""
    if isinstance(error, Mapping):
        message = error.get("message")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) and kind else message
        if isinstance(error.get("result"), str):  # a failed subworkflow's output
            return str(error["result"])
    if isinstance(error, str):
        return error
    return json.dumps(error, sort_keys=True, default=str)


def _timestamp(seconds: float) -> str:
    """A task's time as Mistral shows it: UTC, ``YYYY-MM-DD HH:MM:SS[.ffffff]``."""
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None).isoformat(" ")


def task_view(task: TaskRecord, spec: WorkflowSpec | None = None) -> dict[str, Any]:
    """What ``task('name')`` and ``tasks()`` show an expression."""
    view: dict[str, Any] = {
        "id": task.id,
        "name": task.name,
        "state": task.state.value,
        "state_info": task.state_info or None,
        "result": task.result,
        "published": dict(task.published),
        "workflow_execution_id": task.execution_id,
        "created_at": _timestamp(task.created_at),
        "updated_at": _timestamp(task.updated_at),
    }
    if spec is not None and task.name in spec.tasks:
        view["spec"] = spec.task(task.name).view
        view["type"] = WORKFLOW_TASK_TYPE if spec.task(task.name).workflow is not None else "ACTION"
    return view


class Step:
    """Mutable scratch space for one decision; the result is frozen in decision()."""

    def __init__(
        self, spec: WorkflowSpec, snapshot: Snapshot, now: float, cause: str = "", *,
        new_execution: bool = False,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.execution = snapshot.execution
        self.now = now
        self.cause = cause
        self.snapshot = snapshot
        loaded = [*snapshot.tasks.values(), *snapshot.unfinished]
        if snapshot.task is not None:
            loaded.append(snapshot.task)
        self._states_before: dict[str, TaskState] = {t.id: t.state for t in loaded}
        self._execution_state_before = None if new_execution else snapshot.execution.state
        self.latest: dict[str, TaskRecord] = dict(snapshot.tasks)
        if snapshot.task is not None:
            self.latest.setdefault(snapshot.task.name, snapshot.task)
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
            history=self._history(),
        )

    def _history(self) -> tuple[HistoryEntry, ...]:
        """The state changes this decision makes, in the order they happen: tasks in seq
        order, the execution first when it starts or pauses, last when it ends."""
        ex = self.execution
        entries: list[HistoryEntry] = []
        for task in sorted(self.changed_tasks.values(), key=lambda t: t.seq):
            if self._states_before.get(task.id) != task.state:
                entries.append(HistoryEntry(ex.id, "task", task.state.value, task.state_info,
                                            self.cause, self.now, task.id, task.name))
        if ex.state != self._execution_state_before:
            entry = HistoryEntry(ex.id, "execution", ex.state.value, ex.state_info, self.cause,
                                 self.now)  # fmt: skip
            if ex.state.is_final:
                entries.append(entry)
            else:
                entries.insert(0, entry)
        return tuple(entries)

    def put_task(self, task: TaskRecord, **changes: Any) -> TaskRecord:
        """Record a new version of a task row (``task`` with ``changes``) in this step."""
        if changes or task.updated_at != self.now:
            task = replace(task, updated_at=self.now, **changes)
        self.changed_tasks[task.id] = task
        latest = self.latest.get(task.name)
        if latest is None or latest.seq <= task.seq:
            self.latest[task.name] = task
        return task

    def current(self, task: TaskRecord) -> TaskRecord:
        """The newest version of a task row in this step."""
        return self.changed_tasks.get(task.id, task)

    def put_assignment(self, assignment: AssignmentRecord) -> None:
        self.changed_assignments[assignment.id] = assignment

    def update_execution(self, **changes: Any) -> None:
        self.execution = replace(self.execution, updated_at=self.now, **changes)

    def add_backlog(self, entry: Mapping[str, Any]) -> None:
        self.update_execution(backlog=(*self.execution.backlog, dict(entry)))

    @property
    def running(self) -> bool:
        return self.execution.state == ExecutionState.RUNNING

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

    def evaluate_raw(self, value: Any, context: Any) -> Any:
        """Evaluate against a bare context (an ad-hoc action's output sees its result as $)."""
        return expressions.evaluate(value, context, _Host(self, None))

    def evaluate(self, value: Any, data: Mapping[str, Any], current: TaskRecord | None) -> Any:
        literal = expressions.literal(value)
        if literal is not expressions.HAS_EXPRESSION:
            return literal  # what evaluate() returns for it, without building a context
        return expressions.evaluate(
            value, self.expression_context(data, current), _Host(self, current)
        )

    # -- the execution's end

    def record_unhandled_error(self, task: TaskRecord) -> None:
        line = f"{task.name}\t{task.id}\t{task.state_info}"
        self.update_execution(errors=(*self.execution.errors, line))

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
                    without_versions(final)
                    if self.spec.output is None
                    else self.evaluate(self.spec.output, final, None)
                )
                if not output and self.spec.output is not None:
                    output = without_versions(final)  # Mistral: an empty output falls back
            else:
                on_error = (
                    without_versions(final)
                    if self.spec.output_on_error is None
                    else self.evaluate(self.spec.output_on_error, final, None)
                )
                output = merge_contexts({"result": state_info}, on_error)
        except ExpressionError as e:
            state = ExecutionState.ERROR
            state_info = f"Failed to evaluate the workflow output: {e}"
            output = {"result": state_info}
        # Mistral: tasks already started (even queued) finish on their own; their
        # outcomes are recorded but start nothing. Only cancelling voids open work.
        self.update_execution(state=state, state_info=state_info, output=output)
        parent = self.execution.parent_task_id
        if parent is not None:
            outcome = Outcome.success(output) if state == ExecutionState.SUCCESS else (
                Outcome.failure(output)  # Mistral: the parent task's result is the child output
            )
            ended = ChildExecutionEnded(
                TaskId(parent), self.execution.id, self.execution.item, outcome, self.now
            )
            self.followups.append(ended)


class _TooManyExecutionsRead(Exception):
    """An expression asked for the tasks of more executions than one decision reads."""


class _Host:
    """What expressions may ask about: tasks by name, the execution, its env, globals."""

    def __init__(self, step: Step, current: TaskRecord | None) -> None:
        self._step = step
        self._current = current

    def task(self, name: str | None) -> Mapping[str, Any] | None:
        current = self._current
        if current is not None and (name is None or name == current.name):
            return task_view(current, self._step.spec)
        if name is None:
            return None
        task = self._step.latest.get(name)
        return None if task is None else task_view(task, self._step.spec)

    def tasks(
        self, execution_id: str | None, recursive: bool, state: str | None, flat: bool
    ) -> list[Mapping[str, Any]]:
        step = self._step
        root = ExecutionId(execution_id or step.execution.id)
        others = step.snapshot.others
        wider = recursive or flat  # flat reads the states of subworkflow executions
        if (root != step.execution.id or wider) and not others.has(root, wider):
            if others.closed:
                raise _TooManyExecutionsRead(
                    f"tasks({root}): one decision reads the tasks of at most "
                    f"{MAX_TASK_READS} other executions (or trees of subworkflows)"
                )
            raise TasksNeeded(root, wider)
        return self._listed(root, recursive, state, flat)

    def _listed(
        self, execution_id: ExecutionId, recursive: bool, state: str | None, flat: bool
    ) -> list[Mapping[str, Any]]:
        # Mistral's order: the execution's tasks that pass the filters, then (recursive)
        # those of each subworkflow execution, depth first.
        subworkflows = self._step.snapshot.others.subworkflows
        if execution_id == self._step.execution.id:
            found = self._current_execution_tasks()
        else:
            found = list(self._step.snapshot.others.tasks.get(execution_id, ()))
        listed = [
            t for t in found
            if (state is None or t.get("state") == state)
            and not (flat and t.get("type") == WORKFLOW_TASK_TYPE and any(
                child_state == t.get("state") for _, child_state in subworkflows.get(t["id"], ())
            ))
        ]  # fmt: skip
        if recursive:
            for t in found:
                if t.get("type") == WORKFLOW_TASK_TYPE:
                    for child, _ in subworkflows.get(TaskId(t["id"]), ()):
                        listed.extend(self._listed(child, True, state, flat))
        return listed

    def _current_execution_tasks(self) -> list[Mapping[str, Any]]:
        # The newest execution of each task the step loaded (every task, when an
        # expression calls tasks(): see expressions.referenced_task_names); earlier
        # executions of a task that ran several times (a cycle) are not loaded.
        latest = dict(self._step.latest)
        current = self._current
        if current is not None and latest.get(current.name, current).seq <= current.seq:
            latest[current.name] = current
        return [task_view(t, self._step.spec) for t in sorted(latest.values(), key=lambda t: t.seq)]

    def execution(self) -> Mapping[str, Any]:
        return {**self._step.execution_view(), "spec": self._step.spec.view}

    def env(self) -> Mapping[str, Any]:
        return dict(self._step.execution.env)

    def global_var(self, name: str) -> Any:
        return self._step.execution.context.get(name)
