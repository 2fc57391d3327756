"""Actions the tests' worker processes serve (loaded with --actions levante_test_actions).

- test.record: appends a line to $LEVANTE_TEST_LOG (one O_APPEND write, so lines from
  concurrent workers never interleave), then returns ``output``. Counting lines counts
  how many times an action really ran.
- test.gate: waits until the file $LEVANTE_TEST_GATES/<name> exists, so a test can
  hold assignments inside a worker while it kills something.
- test.boom: raises ValueError(message).
- test.wait_deferred: hands its task_id to $LEVANTE_TEST_LOG and defers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from levante.worker import DEFERRED, ActionContext, action


def _log(line: str) -> None:
    path = os.environ.get("LEVANTE_TEST_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@action("test.record")
def record(key: str, output: Any = None, context: ActionContext | None = None) -> Any:
    _log(f"{key} {context.task_id if context else ''}".strip())
    return output


@action("test.gate")
def gate(name: str, output: Any = None, context: ActionContext | None = None) -> Any:
    _log(f"gate-entered {name} {context.task_id if context else ''}".strip())
    gates = Path(os.environ["LEVANTE_TEST_GATES"])
    deadline = time.monotonic() + 120
    while not (gates / name).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {name} never opened")
        time.sleep(0.02)
    _log(f"gate-passed {name} {context.task_id if context else ''}".strip())
    return output


@action("test.boom")
def boom(message: str = "boom") -> None:
    raise ValueError(message)


@action("test.wait_deferred")
def wait_deferred(context: ActionContext) -> object:
    _log(f"deferred {context.task_id}")
    return DEFERRED


@action("test.async_gate")
async def async_gate(name: str, context: ActionContext) -> str:
    """Like test.gate, but async, so that an AssignmentCancelled can stop it."""
    import asyncio

    _log(f"async-entered {name} {context.task_id}")
    gates = Path(os.environ["LEVANTE_TEST_GATES"])
    try:
        while not (gates / name).exists():
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        _log(f"async-cancelled {name} {context.task_id}")
        raise
    return name


@action("test.maybe_fail")
def maybe_fail(key: str, fail: bool = False, context: ActionContext | None = None) -> str:
    """Records that it ran, then fails when asked to (for error branches)."""
    _log(f"{key} {context.task_id if context else ''}".strip())
    if fail:
        raise RuntimeError(f"{key} failed on purpose")
    return key
