"""The standard actions (``std.*``) that every bundled worker can serve.

Their behaviour follows Mistral's standard actions of the same names:

* ``std.noop``: does nothing, returns ``None``;
* ``std.echo output=... [delay=0]``: returns ``output`` (after ``delay`` seconds;
  a negative or unparseable delay means none);
* ``std.fail [error_data=...]``: always fails; with truthy ``error_data`` the
  error *is* that data, otherwise an ``ActionException`` with the message
  ``"Fail action expected exception."``;
* ``std.sleep [seconds=1]``: sleeps without blocking the worker, returns ``None``
  (negative, infinite or unparseable means 0; fractions are honoured, unlike Mistral's
  whole seconds);
* ``std.async_noop``: deferred; its outcome comes later through
  ``Engine.TaskComplete``.

They live in a registry of their own; :func:`std_actions` returns a copy to
serve or to merge with ``ActionRegistry.include``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from levante.worker.registry import DEFERRED, ActionException, ActionRegistry

__all__ = ["FAIL_MESSAGE", "std_actions"]

logger = logging.getLogger("levante.worker")

FAIL_MESSAGE = "Fail action expected exception."

_STD = ActionRegistry()


def _seconds(value: Any) -> float:
    """Mistral's lenient parsing of a duration: negative or unparseable -> 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


@_STD.action("std.noop")
def noop() -> None:
    """Does nothing."""
    return None


@_STD.action("std.echo")
async def echo(output: Any, delay: Any = 0) -> Any:
    """Returns ``output``, after ``delay`` seconds."""
    seconds = _seconds(delay)
    if seconds:
        await asyncio.sleep(seconds)
    return output


@_STD.action("std.fail")
def fail(error_data: Any = None) -> None:
    """Always fails; with ``error_data`` the error is that data."""
    if error_data:
        raise ActionException(FAIL_MESSAGE, error_data=error_data)
    raise ActionException(FAIL_MESSAGE)


@_STD.action("std.sleep")
async def sleep(seconds: Any = 1) -> None:
    """Sleeps for ``seconds``."""
    await asyncio.sleep(_seconds(seconds))
    return None


@_STD.action("std.async_noop")
def async_noop() -> object:
    """Completes later, through Engine.TaskComplete."""
    return DEFERRED


def std_actions() -> ActionRegistry:
    """A new registry holding the standard actions."""
    return ActionRegistry().include(_STD)
