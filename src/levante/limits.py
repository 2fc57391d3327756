"""Size limits on what callers and workers send, in one place.

This module owns the limit values (``Limits``, a frozen dataclass whose defaults are
the documented ones; ``levante serve --max-...`` flags override them) and the checks.
A refused value raises ``LimitExceededError`` (errors.py), which rpc/status.py maps to
RESOURCE_EXHAUSTED. It is pure: no I/O, no grpc.

Rules:
- A message names the field, the size found and the limit by its flag's name, so a
  caller knows what to shrink and an operator knows what to raise.
- Text is measured in UTF-8 bytes, as it travels and is stored.
- JSON text is checked before it is decoded (its size, then its nesting depth, read
  from the brackets outside strings), so no oversized or deeply nested document is
  ever turned into Python objects; decoded values are checked the same way, for what
  arrives already decoded (the in-process runner, a worker's result).
- Expression time and output size are limited in lang/expressions.py, not here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from levante.errors import LimitExceededError

__all__ = [
    "DEFAULT_LIMITS",
    "LimitExceededError",
    "Limits",
    "check_definition",
    "check_json_text",
    "check_json_value",
    "check_task_count",
    "with_items_message",
]

MIB = 1024 * 1024


def _limit(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """What one engine accepts. Each field is a ``levante serve --max-...`` flag."""

    definition_bytes: int = _limit(
        1 * MIB, "bytes of a workflow definition (RegisterWorkflows, Run's definition)"
    )
    tasks_per_workflow: int = _limit(10_000, "tasks in one workflow of a definition")
    input_bytes: int = _limit(4 * MIB, "bytes of Run's input_json, and of its params_json")
    result_bytes: int = _limit(
        4 * MIB, "bytes of a task's result or error JSON (TaskComplete, worker results)"
    )
    json_depth: int = _limit(64, "how deep lists and objects may nest in a JSON field")
    with_items: int = _limit(
        10_000, "items of one with-items task (beyond it the task fails)"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{flag_name(f.name)} must be a positive integer, not {value!r}")

    @classmethod
    def options(cls) -> list[tuple[str, str, int, str]]:
        """Each limit as (field name, flag name, default, help), for the CLI and docs."""
        defaults = cls()
        return [
            (f.name, flag_name(f.name), getattr(defaults, f.name), f.metadata["help"])
            for f in fields(cls)
        ]


DEFAULT_LIMITS = Limits()


def flag_name(field_name: str) -> str:
    return "max-" + field_name.replace("_", "-")


def _exceeded(field: str, found: str, limit: str, value: int) -> LimitExceededError:
    return LimitExceededError(f"{field}: {found}, more than the limit {limit}={value}")


def _size(found: int) -> str:
    return f"{found} bytes"


def check_definition(text: str, limits: Limits, field: str = "definition") -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.definition_bytes:
        raise _exceeded(
            field, _size(size), flag_name("definition_bytes"), limits.definition_bytes
        )


def check_task_count(workflow: str, count: int, limits: Limits, line: int | None) -> None:
    if count > limits.tasks_per_workflow:
        where = f"workflow '{workflow}'" + (f" (line {line})" if line is not None else "")
        raise _exceeded(
            where, f"{count} tasks", flag_name("tasks_per_workflow"), limits.tasks_per_workflow
        )


def with_items_message(count: int, limit: int) -> str:
    """The state_info of a with-items task over more items than allowed."""
    return (
        f"with-items: {count} items, more than the limit {flag_name('with_items')}={limit}"
    )


# A JSON string (escapes included) or one bracket: what a depth scan has to look at.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def json_text_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether the brackets of ``text`` (outside strings) nest deeper than ``max_depth``.

    Malformed text is left to the decoder to refuse; this only bounds its work.
    """
    if "[" not in text and "{" not in text:
        return False
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


JsonLimit = Literal["input_bytes", "result_bytes"]


def _check_text_size(text: str, field: str, limit: JsonLimit, limits: Limits) -> None:
    max_bytes: int = getattr(limits, limit)
    # A character is at most four bytes: only long text needs encoding to be measured.
    if len(text) * 4 > max_bytes:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise _exceeded(field, _size(size), flag_name(limit), max_bytes)


def check_json_text(text: str, field: str, limit: JsonLimit, limits: Limits) -> None:
    """Refuse JSON text larger than ``limits.<limit>`` or nested deeper than allowed."""
    if not text:
        return
    _check_text_size(text, field, limit, limits)
    if json_text_depth_exceeds(text, limits.json_depth):
        raise _exceeded(
            field, "nested too deep", flag_name("json_depth"), limits.json_depth
        )


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Iterative, so a value nested thousands deep cannot exhaust the Python stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            depth += 1
            if depth > max_depth:
                return True
            children: Iterator[Any] = iter(item.values() if isinstance(item, dict) else item)
            stack.extend((child, depth) for child in children)
    return False


def check_json_value(value: Any, field: str, limit: JsonLimit, limits: Limits) -> None:
    """The checks of ``check_json_text``, on a value already decoded."""
    if value is None or (not value and type(value) in (dict, list)):
        return  # most results: nothing to measure
    if _depth_exceeds(value, limits.json_depth):
        raise _exceeded(
            field, "nested too deep", flag_name("json_depth"), limits.json_depth
        )
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return  # not JSON: the store's own encoding refuses it with its own message
    _check_text_size(text, field, limit, limits)
