"""Levante: a lazy, persistent workflow engine speaking the Mistral Workflow Language v2.

The public API:

- ``run_workflow(definition, workflow=None, input=None, actions=None)``: run a workflow
  to the end in this process (the synchronous engine on the lazy core).
- ``LocalEngine``: the same, asynchronous, for many executions at once.
- ``Client`` / ``SyncClient``: the Engine gRPC API from Python.
- ``action``: register a Python function as an action for ``levante worker``.
- the error tree in ``levante.errors``.
"""

from levante.client import Client, EngineUnavailableError, ExecutionInfo, SyncClient, TaskInfo
from levante.errors import (
    AlreadyCompletedError,
    ConflictError,
    DefinitionError,
    ExpressionError,
    InvalidArgumentError,
    InvalidInputError,
    LevanteError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    StoreError,
    UnauthenticatedError,
)
from levante.runner import ExecutionResult, LocalEngine, run_workflow
from levante.worker import ActionContext, action

__all__ = [
    "ActionContext",
    "AlreadyCompletedError",
    "Client",
    "ConflictError",
    "DefinitionError",
    "EngineUnavailableError",
    "ExecutionInfo",
    "ExecutionResult",
    "ExpressionError",
    "InvalidArgumentError",
    "InvalidInputError",
    "LevanteError",
    "LimitExceededError",
    "LocalEngine",
    "NotFoundError",
    "PermissionDeniedError",
    "StoreError",
    "SyncClient",
    "TaskInfo",
    "UnauthenticatedError",
    "action",
    "run_workflow",
]
