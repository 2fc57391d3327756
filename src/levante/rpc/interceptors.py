"""Server interceptors: RPCs counted by service, method and status code.

Each handler is wrapped in a function of the same kind (coroutine or async generator:
grpc.aio decides how to run a handler from its kind) that counts the call once it has
ended, with the code the caller sees: the one an abort or ``set_code`` chose, else OK
for a return, CANCELLED for a cancellation and UNKNOWN for an exception that escaped.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from levante.observability.metrics import Metrics

__all__ = ["RpcMetricsInterceptor"]

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        service, _, method = str(handler_call_details.method).lstrip("/").rpartition("/")
        counter = self._metrics.rpcs

        def count(code: str) -> None:
            counter.labels(service, method, code).inc()

        for kind in _KINDS:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return handler._replace(**{kind: _counted(behaviour, count)})
        return handler


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the caller sees: set by abort or set_code, else from how the call ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return str(code.name)
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"  # what gRPC answers for an exception that escapes a handler


def _counted(behaviour: Callable[..., Any], count: Callable[[str], None]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            inner = behaviour(request, context)
            error: BaseException | None = None
            try:
                async for message in inner:
                    yield message
            except BaseException as e:
                error = e
                raise
            finally:
                try:
                    await inner.aclose()  # its own cleanup runs now, not when collected
                finally:
                    count(_code(context, error))

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = await behaviour(request, context)
        except BaseException as e:
            count(_code(context, e))
            raise
        count(_code(context, None))
        return result

    return call
