"""Calling one action with one assignment's input: every way it can end becomes data.

Shared by the gRPC worker runtime and the in-process runner, so that an action
behaves the same wherever it runs. Errors are reported as
``{"type": "<ExceptionClass>", "message": "..."}`` unless the action raised
ActionException with explicit ``error_data``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from levante.worker.registry import (
    CONTEXT_PARAMETER,
    DEFERRED,
    ActionContext,
    ActionException,
    ActionRegistry,
    ActionSpec,
)

logger = logging.getLogger("levante.worker")


@dataclass(frozen=True)
class Invocation:
    """How one call ended: a result, an error, or a deferral."""

    ok: bool
    value: Any = None
    deferred: bool = False

    @staticmethod
    def error(kind: str, message: str) -> Invocation:
        return Invocation(False, {"type": kind, "message": message})


async def invoke_action(
    registry: ActionRegistry,
    action: str,
    action_input: Any,
    context: ActionContext,
    executor: Executor | None = None,
) -> Invocation:
    """Run ``action`` with ``action_input`` (a JSON object) as keyword arguments."""
    prepared = _prepare(registry, action, action_input, context)
    if isinstance(prepared, Invocation):
        return prepared
    spec, kwargs = prepared
    try:
        value = await _call(spec, kwargs, executor)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return Invocation.error("CancelledError", f"{spec.name} was cancelled")
    except Exception as exc:
        return _failed(spec, exc)
    return _returned(spec, value)


def invoke_now(
    registry: ActionRegistry, action: str, action_input: Any, context: ActionContext
) -> Invocation | None:
    """Call an immediate action here and now, on the caller's thread, without a task: a
    plain function, or a coroutine run to its end in one step. None when ``action`` is
    not immediate (``invoke_action`` runs it). A coroutine that waits after all fails."""
    spec = registry.get(action)
    if spec is None or not spec.immediate:
        return None
    prepared = _prepare(registry, action, action_input, context)
    if isinstance(prepared, Invocation):
        return prepared
    spec, kwargs = prepared
    try:
        value = spec.fn(**kwargs)
        if inspect.iscoroutine(value):
            try:
                value.send(None)
            except StopIteration as done:
                value = done.value
            else:
                value.close()
                return Invocation.error(
                    "ImmediateActionWaited",
                    f"{spec.name} is declared immediate but waited: declare it without "
                    "immediate=True",
                )
    except Exception as exc:
        return _failed(spec, exc)
    return _returned(spec, value)


def _prepare(
    registry: ActionRegistry, action: str, action_input: Any, context: ActionContext
) -> tuple[ActionSpec, dict[str, Any]] | Invocation:
    """The action and its keyword arguments, or the error that ends the call first."""
    spec = registry.get(action)
    if spec is None:
        return Invocation.error("ActionNotFound", f"action {action!r} is not served here")
    if action_input is None:
        action_input = {}
    if not isinstance(action_input, dict):
        return Invocation.error(
            "InvalidInput", f"input must be a JSON object, not {type(action_input).__name__}"
        )
    kwargs = dict(action_input)
    if spec.wants_context:
        if CONTEXT_PARAMETER in kwargs:
            return Invocation.error(
                "InvalidInput",
                f"{spec.name}: input names {CONTEXT_PARAMETER!r}, the parameter that "
                "receives the action context",
            )
        kwargs[CONTEXT_PARAMETER] = context
    if not spec.takes(kwargs):
        try:
            spec.signature.bind(**kwargs)
        except TypeError as exc:
            return Invocation.error("TypeError", f"{spec.name}: {exc}")
    return spec, kwargs


def _failed(spec: ActionSpec, exc: Exception) -> Invocation:
    if isinstance(exc, ActionException):
        if exc.error_data is not None:
            return _checked(Invocation(False, exc.error_data), spec)
        return Invocation.error(type(exc).__name__, str(exc))
    logger.debug("action %s raised", spec.name, exc_info=True)
    return Invocation.error(type(exc).__name__, str(exc))


def _returned(spec: ActionSpec, value: Any) -> Invocation:
    if value is DEFERRED or spec.deferred:
        return Invocation(True, None, deferred=True)
    return _checked(Invocation(True, value), spec)


_STRICT_JSON = json.JSONEncoder(allow_nan=False)
_ALWAYS_JSON = (type(None), bool, int, str)  # no NaN, nothing that needs a look inside


def _checked(invocation: Invocation, spec: ActionSpec) -> Invocation:
    """Values must survive JSON (no NaN, no objects); otherwise the call failed."""
    if type(invocation.value) in _ALWAYS_JSON:
        return invocation
    try:
        _STRICT_JSON.encode(invocation.value)
    except (TypeError, ValueError, RecursionError) as exc:
        what = "returned a value" if invocation.ok else "failed with error data"
        message = f"{spec.name} {what} that is not JSON: {exc}"
        return Invocation.error("ResultNotSerializable", message)
    return invocation


async def _call(spec: ActionSpec, kwargs: dict[str, Any], executor: Executor | None) -> Any:
    if spec.is_async:
        value = await spec.fn(**kwargs)
    else:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(
            executor, functools.partial(context.run, spec.fn, **kwargs)
        )
    if type(value) not in _ALWAYS_JSON and inspect.isawaitable(value):
        # a plain function that returned a coroutine
        value = await value
    return value
