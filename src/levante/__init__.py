"""Levante: a lazy, persistent workflow engine speaking the Mistral Workflow Language v2.

The public API:

- ``run_workflow(definition, workflow=None, input=None, actions=None)``: run a workflow
  to the end in this process (the synchronous engine on the lazy core).
- ``LocalEngine``: the same, asynchronous, for many executions at once.
- ``Client`` / ``SyncClient``: the Engine gRPC API from Python.
- ``action``: register a Python function as an action for ``levante worker``.
- the error tree in ``levante.errors``.
"""

from levante.client import Client, ExecutionInfo, SyncClient, TaskInfo
from levante.errors import (
    AlreadyCompletedError,
    ConflictError,
    DefinitionError,
    ExpressionError,
    InvalidArgumentError,
    InvalidInputError,
    LevanteError,
    NotFoundError,
    StoreError,
)
from levante.runner import ExecutionResult, LocalEngine, run_workflow
from levante.worker import ActionContext, action

__all__ = [
    "ActionContext",
    "AlreadyCompletedError",
    "Client",
    "ConflictError",
    "DefinitionError",
    "ExecutionInfo",
    "ExecutionResult",
    "ExpressionError",
    "InvalidArgumentError",
    "InvalidInputError",
    "LevanteError",
    "LocalEngine",
    "NotFoundError",
    "StoreError",
    "SyncClient",
    "TaskInfo",
    "action",
    "run_workflow",
]
