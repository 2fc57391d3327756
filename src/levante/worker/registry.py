"""Action registration: what a worker can run, and how an action is called.

This module owns:

* :class:`ActionRegistry`, a mapping from action names (``"std.echo"``) to Python
  callables, plain or ``async def``;
* the :func:`action` decorator, which registers into :data:`default_registry`
  (``ActionRegistry.action`` does the same for any other registry);
* :class:`ActionContext`, handed to an action that declares a parameter named
  ``context`` (so that it can pass its ``task_id`` to an external system);
* :data:`DEFERRED`, the value an action returns to say that its outcome will
  arrive later through ``Engine.TaskComplete``;
* :class:`ActionException`, raised by an action to fail with explicit error data;
* :func:`load_action_modules`, which imports user modules so that their
  decorators run.

It knows nothing of gRPC; the runtime (``levante.worker.runtime``) calls actions.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, TypeVar, overload

__all__ = [
    "DEFERRED",
    "ActionContext",
    "ActionException",
    "ActionRegistry",
    "ActionSpec",
    "action",
    "default_registry",
    "load_action_modules",
]

logger = logging.getLogger("levante.worker")

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_PARAMETER: Final = "context"


@dataclass(frozen=True, slots=True)
class ActionContext:
    """Where a running action sits in the engine; passed as ``context=``."""

    task_id: str
    execution_id: str
    task_name: str
    attempt: int


class _Deferred:
    """Type of :data:`DEFERRED`; there is only one instance."""

    _instance: _Deferred | None = None

    def __new__(cls) -> _Deferred:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFERRED"

    def __reduce__(self) -> str:
        return "DEFERRED"


DEFERRED: Final = _Deferred()
"""Return this from an action whose outcome will come later through Engine.TaskComplete."""


class ActionException(Exception):
    """Raised by an action to fail.

    Without ``error_data`` the error is reported by convention as
    ``{"type": "ActionException", "message": str(exc)}``. With ``error_data`` (any
    JSON-serializable value) the error *is* that data, as with Mistral's
    ``std.fail error_data=...``.
    """

    def __init__(self, message: str = "", error_data: Any = None) -> None:
        super().__init__(message)
        self.error_data = error_data


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One registered action and what the runtime needs to know to call it."""

    name: str
    fn: Callable[..., Any]
    signature: inspect.Signature
    is_async: bool
    deferred: bool
    wants_context: bool
    # What keyword arguments the signature takes, so that a call's arguments are
    # checked without Signature.bind (which costs more than many actions do).
    keywords: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    any_keyword: bool = False
    # A computation that never waits (no I/O, no sleep): a worker may run it where the
    # assignment arrives, without a task or a thread of its own (see invoke_now).
    immediate: bool = False

    def takes(self, names: Collection[str]) -> bool:
        """Whether keyword arguments called ``names`` bind to the signature; False may
        also mean "ask Signature.bind" (a required positional-only parameter)."""
        if not self.required.issubset(names):
            return False
        return self.any_keyword or self.keywords.issuperset(names)

    @classmethod
    def build(
        cls, name: str, fn: Callable[..., Any], *, deferred: bool, immediate: bool = False
    ) -> ActionSpec:
        if not isinstance(name, str) or not name:
            raise ValueError(f"action name must be a non-empty string, not {name!r}")
        if deferred and immediate:
            raise ValueError(f"action {name!r}: a deferred action cannot be immediate")
        if not callable(fn):
            raise TypeError(f"action {name!r}: {fn!r} is not callable")
        signature = inspect.signature(fn)
        context = signature.parameters.get(CONTEXT_PARAMETER)
        wants_context = context is not None and context.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        )
        by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = signature.parameters.values()
        keywords = frozenset(p.name for p in params if p.kind in by_keyword)
        required = frozenset(
            p.name for p in params
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        )  # fmt: skip
        any_keyword = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if any(p.kind == inspect.Parameter.POSITIONAL_ONLY for p in params if p.name in required):
            keywords, any_keyword = frozenset(), False  # no call by keyword binds: bind says why
        return cls(name, fn, signature, is_async, deferred, wants_context,
                   keywords, required, any_keyword, immediate)  # fmt: skip


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """True when ``b`` is ``a`` or the same definition imported again (a reload)."""
    if a is b:
        return True
    key_a = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    key_b = (getattr(b, "__module__", None), getattr(b, "__qualname__", None))
    return None not in key_a and key_a == key_b


class ActionRegistry:
    """Action names mapped to callables. Iterates over names in sorted order."""

    def __init__(self) -> None:
        self._specs: dict[str, ActionSpec] = {}

    def register(
        self, name: str, fn: Callable[..., Any], *, deferred: bool = False,
        immediate: bool = False,
    ) -> ActionSpec:  # fmt: skip
        """Registers ``fn`` as ``name``.

        Registering another function under a taken name raises ``ValueError``;
        registering the same definition again (a module imported twice) replaces it.
        """
        return self._add(ActionSpec.build(name, fn, deferred=deferred, immediate=immediate))

    def _add(self, spec: ActionSpec) -> ActionSpec:
        existing = self._specs.get(spec.name)
        if existing is not None and not _same_definition(existing.fn, spec.fn):
            raise ValueError(f"action {spec.name!r} is already registered to {existing.fn!r}")
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        """Forgets ``name``; ``KeyError`` when it is not registered."""
        del self._specs[name]

    @overload
    def action(self, fn: F, /) -> F: ...

    @overload
    def action(
        self, name: str | None = None, /, *, deferred: bool = False, immediate: bool = False
    ) -> Callable[[F], F]: ...

    def action(
        self, name_or_fn: str | Callable[..., Any] | None = None, /, *,
        deferred: bool = False, immediate: bool = False,
    ) -> Any:  # fmt: skip
        """Decorator: ``@registry.action``, ``@registry.action("name", deferred=True)``.

        Without a name the function's ``__name__`` is used. The function is
        returned unchanged, so it stays callable as ordinary Python. ``immediate=True``
        declares a computation that never waits (no I/O, no sleep): the in-process
        runner runs it where the task is handed out, without a task or a thread; there,
        an ``async def`` one that does wait fails the task.
        """
        if callable(name_or_fn):
            fn = name_or_fn
            self.register(fn.__name__, fn, deferred=deferred, immediate=immediate)
            return fn

        def decorate(fn: F) -> F:
            self.register(name_or_fn or fn.__name__, fn, deferred=deferred, immediate=immediate)
            return fn

        return decorate

    def include(self, other: ActionRegistry) -> ActionRegistry:
        """Registers every action of ``other`` here; returns ``self``."""
        for spec in other._specs.values():
            self._add(spec)  # specs are immutable: shared, not inspected again
        return self

    def get(self, name: str) -> ActionSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"ActionRegistry({self.names()!r})"


default_registry: Final = ActionRegistry()
"""Where :func:`action` registers; what ``load_action_modules`` fills."""


@overload
def action(fn: F, /) -> F: ...


@overload
def action(
    name: str | None = None, /, *, deferred: bool = False, immediate: bool = False
) -> Callable[[F], F]: ...


def action(
    name_or_fn: str | Callable[..., Any] | None = None, /, *, deferred: bool = False,
    immediate: bool = False,
) -> Any:  # fmt: skip
    """Registers a function into :data:`default_registry`.

    ``@action`` (name = the function's name), ``@action("billing.charge")`` or
    ``@action("billing.charge", deferred=True)`` for an action whose outcome comes
    later through ``Engine.TaskComplete`` (the worker sends ``TaskDeferred``), or
    ``immediate=True`` for a computation that never waits (see ActionRegistry.action).
    """
    if callable(name_or_fn):
        return default_registry.action(name_or_fn)
    return default_registry.action(name_or_fn, deferred=deferred, immediate=immediate)


def load_action_modules(names: Iterable[str]) -> list[ModuleType]:
    """Imports modules by dotted name so that their ``@action`` decorators run.

    The current directory is put on ``sys.path`` first (when it is not there), so
    ``levante worker -m my_actions`` finds ``./my_actions.py``. Import errors
    propagate to the caller.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    modules = []
    for name in names:
        module = importlib.import_module(name)
        logger.info("loaded action module %s", name)
        modules.append(module)
    return modules
