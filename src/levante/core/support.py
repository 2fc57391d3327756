"""What of the language this engine runs today; the rest is refused at registration.

A feature the core does not carry out yet must never be silently ignored: a workflow
that relies on it is refused with the line that uses it, so nobody runs a workflow
that would behave differently from Mistral. Each entry leaves this list when the core
implements it.
"""

from __future__ import annotations

from levante.lang.spec import Document, PoliciesSpec, TaskSpec, WorkflowSpec

_POLICY_NAMES = {
    "retry": "retry",
    "timeout": "timeout",
    "wait_before": "wait-before",
    "wait_after": "wait-after",
    "pause_before": "pause-before",
    "fail_on": "fail-on",
    "concurrency": "concurrency",
}


def unsupported_features(document: Document) -> list[tuple[int | None, str]]:
    """(line, message) for each use of a feature this engine does not run yet."""
    found: list[tuple[int | None, str]] = []
    for action in document.actions.values():
        found.append((action.line, f"ad-hoc action '{action.name}' is not supported yet"))
    for workflow in document.workflows.values():
        found.extend(_workflow(workflow))
    return found


def _workflow(workflow: WorkflowSpec) -> list[tuple[int | None, str]]:
    where = f"workflow '{workflow.name}'"
    if workflow.type != "direct":
        return [(workflow.line, f"{where}: {workflow.type} workflows are not supported yet")]
    found: list[tuple[int | None, str]] = []
    for task in workflow.tasks.values():
        found.extend((task.line, f"{where}: task '{task.name}': {m}") for m in _task(task))
    return found


def _task(task: TaskSpec) -> list[str]:
    messages: list[str] = []
    if task.workflow is not None:
        messages.append("subworkflows ('workflow:') are not supported yet")
    if task.with_items is not None:
        messages.append("with-items is not supported yet")
    if task.target is not None:
        messages.append("target is not supported yet")
    if task.keep_result is not True:
        messages.append("keep-result is not supported yet")
    default = PoliciesSpec()
    for field, name in _POLICY_NAMES.items():
        if getattr(task.policies, field) != getattr(default, field):
            messages.append(f"{name} is not supported yet")
    for clause in task.clauses():
        if clause.publish or clause.publish_global:
            messages.append("publishing inside on-* clauses is not supported yet")
        if any(t.target == "pause" for t in clause.transitions):
            messages.append("the 'pause' command is not supported yet")
    return messages
