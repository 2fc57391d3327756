"""Levante's bundled Python worker: the public API.

Register actions with ``@action`` (into ``default_registry``) or on an
``ActionRegistry`` of your own, then serve them::

    from levante.worker import ActionContext, action, default_registry, serve_worker

    @action("billing.charge")
    async def charge(amount: int, context: ActionContext) -> dict[str, str]:
        ...

    await serve_worker("localhost:50051", default_registry, capacity=10, stop=stop_event)

The standard actions (``std.noop``, ``std.echo``, ``std.fail``, ``std.sleep``,
``std.async_noop``) come from ``levante.worker.std.std_actions()``.
"""

from levante.worker.registry import (
    DEFERRED,
    ActionContext,
    ActionRegistry,
    action,
    default_registry,
    load_action_modules,
)
from levante.worker.runtime import serve_worker

__all__ = [
    "DEFERRED",
    "ActionContext",
    "ActionRegistry",
    "action",
    "default_registry",
    "load_action_modules",
    "serve_worker",
]
