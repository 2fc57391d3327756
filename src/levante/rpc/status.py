"""Levante errors -> gRPC status codes, in one table, at one boundary.

Servicer methods are wrapped with ``translate_errors``: a LevanteError aborts the call
with its mapped code and message; anything else is logged with its traceback and
becomes INTERNAL with a short message, so no traceback ever reaches a caller.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from levante.errors import (
    ConflictError,
    InvalidArgumentError,
    LevanteError,
    NotFoundError,
    StoreError,
)

log = logging.getLogger("levante.rpc")

# Most specific class first.
STATUS_BY_ERROR: tuple[tuple[type[LevanteError], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (LevanteError, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for ``error``."""
    if isinstance(error, LevanteError):
        for cls, code in STATUS_BY_ERROR:
            if isinstance(error, cls):
                return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"


R = TypeVar("R")


def translate_errors(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Wrap a unary servicer method so that errors leave as status codes."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except LevanteError as e:
            code, message = status_for(e)
            await context.abort(code, message)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("unexpected error in %s", method.__name__)
            code, message = status_for(e)
            await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper
