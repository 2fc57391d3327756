"""What of the language this engine runs today; the rest is refused at registration.

A feature the core does not carry out yet must never be silently ignored: a workflow
that relies on it is refused with the line that uses it, so nobody runs a workflow
that would behave differently from Mistral. Each entry leaves this list when the core
implements it.
"""

from __future__ import annotations

from levante.lang.spec import Document, TaskSpec


def unsupported_features(document: Document) -> list[tuple[int | None, str]]:
    """(line, message) for each use of a feature this engine does not run yet."""
    found: list[tuple[int | None, str]] = []
    for workflow in document.workflows.values():
        where = f"workflow '{workflow.name}'"
        for task in workflow.tasks.values():
            found.extend((task.line, f"{where}: task '{task.name}': {m}") for m in _task(task))
    return found


def _task(task: TaskSpec) -> list[str]:
    messages: list[str] = []
    if task.policies.pause_before not in (None, False):
        messages.append("pause-before is not supported yet (it needs ResumeExecution)")
    for clause in task.clauses():
        if any(t.target == "pause" for t in clause.transitions):
            messages.append("the 'pause' command is not supported yet (it needs ResumeExecution)")
    return messages
