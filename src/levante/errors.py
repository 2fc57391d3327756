"""Levante's error tree. Every error the engine raises on purpose is one of these.

    LevanteError
    ├── InvalidArgumentError        bad input from a caller: the request changes nothing
    │   ├── DefinitionError         YAML that is not a valid workflow (names the line)
    │   ├── InvalidInputError       workflow input or params that do not fit the workflow
    │   ├── ExpressionError         an expression that cannot be parsed or evaluated
    │   └── LimitExceededError      larger or deeper than a limit (levante/limits.py)
    ├── NotFoundError               unknown workflow, execution or task
    ├── UnauthenticatedError        no bearer token, or one the server does not know
    ├── PermissionDeniedError       a known token whose role may not call the method
    ├── ConflictError               a request that contradicts what is recorded
    │   ├── AlreadyCompletedError   a different outcome for a task already completed
    │   └── RequestIdTakenError     another Run with the same request_id committed first
    └── StoreError                  the store failed (driver errors are wrapped in store/)

The gRPC layer maps each class to a status code in one table (rpc/status.py); any
other exception becomes INTERNAL there, with a log line and no traceback to the caller.
"""

from __future__ import annotations


class LevanteError(Exception):
    """Base of every error Levante raises on purpose."""


class InvalidArgumentError(LevanteError):
    """The caller sent something malformed; nothing was changed."""


class DefinitionError(InvalidArgumentError):
    """A workflow definition that cannot be accepted.

    ``line`` is 1-based when known, so that the message can point at the YAML.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        self.reason = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


class InvalidInputError(InvalidArgumentError):
    """Workflow input or start params that do not fit the workflow."""


class ExpressionError(InvalidArgumentError):
    """An expression that cannot be parsed or evaluated."""


class LimitExceededError(InvalidArgumentError):
    """Larger, deeper or longer than a configured limit (levante/limits.py); nothing changed.

    The message names the field and the limit by its ``levante serve`` flag.
    """


class UnauthenticatedError(LevanteError):
    """The call carried no bearer token, or one the server does not know."""


class PermissionDeniedError(LevanteError):
    """The call's token is known, but its role may not call this method."""


class NotFoundError(LevanteError):
    """An unknown workflow, execution or task."""


class ConflictError(LevanteError):
    """The request contradicts recorded state (maps to FAILED_PRECONDITION)."""


class AlreadyCompletedError(ConflictError):
    """A different outcome arrived for an assignment whose outcome is recorded."""


class RequestIdTakenError(ConflictError):
    """Raised by a store when inserting an execution whose request_id exists already."""


class StoreError(LevanteError):
    """The store failed; the transaction was rolled back."""
