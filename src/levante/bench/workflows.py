"""The benchmark's workflows, generated as Mistral v2 YAML.

Every task names ``action: std.noop`` explicitly: a task without an action is run
inline by the engine, and the benchmark wants workers to really run each task.
"""

from __future__ import annotations

__all__ = ["chain", "fan_out", "waiter", "with_items"]

_HEADER = "version: '2.0'\n"


def chain(name: str, n: int) -> str:
    """``n`` sequential std.noop tasks."""
    lines = [_HEADER + f"{name}:", "  tasks:"]
    for i in range(n):
        lines.append(f"    t{i}:")
        lines.append("      action: std.noop")
        if i + 1 < n:
            lines.append(f"      on-success: [t{i + 1}]")
    return "\n".join(lines) + "\n"


def fan_out(name: str, n: int) -> str:
    """One task, ``n`` parallel tasks after it, one ``join: all`` task after them."""
    branches = [f"p{i}" for i in range(n)]
    lines = [
        _HEADER + f"{name}:",
        "  tasks:",
        "    start:",
        "      action: std.noop",
        "      on-success:",
    ]
    lines += [f"        - {b}" for b in branches]
    for b in branches:
        lines += [f"    {b}:", "      action: std.noop", "      on-success: [join]"]
    lines += ["    join:", "      join: all", "      action: std.noop"]
    return "\n".join(lines) + "\n"


def with_items(name: str, concurrency: int) -> str:
    """One task over the input list ``items``, at most ``concurrency`` at once."""
    return (
        _HEADER
        + f"{name}:\n"
        + "  input: [items]\n"
        + "  tasks:\n"
        + "    each:\n"
        + "      with-items: i in <% $.items %>\n"
        + f"      concurrency: {concurrency}\n"
        + "      action: std.noop\n"
    )


def waiter(name: str) -> str:
    """One deferred task: it waits until someone calls TaskComplete."""
    return _HEADER + f"{name}:\n  tasks:\n    wait:\n      action: std.async_noop\n"
