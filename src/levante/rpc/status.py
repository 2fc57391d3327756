"""Levante errors -> gRPC status codes, in one table, at one boundary.

Servicer methods are wrapped with ``translate_errors``: a LevanteError aborts the call
with its mapped code and message; anything else is logged with its traceback and
becomes INTERNAL with a short message, so no traceback ever reaches a caller.
``DecodeErrorInterceptor`` does the same for requests protobuf cannot decode (invalid
UTF-8 in a string field, truncated bytes): INVALID_ARGUMENT naming the field if it can.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from levante.errors import (
    ConflictError,
    InvalidArgumentError,
    LevanteError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    StoreError,
    UnauthenticatedError,
)

log = logging.getLogger("levante.rpc")

# Most specific class first.
STATUS_BY_ERROR: tuple[tuple[type[LevanteError], grpc.StatusCode], ...] = (
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
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


# ------------------------------------------------------------ undecodable requests


class _Undecodable:
    """Stands in for a request that did not decode, so that the handler can refuse it."""

    def __init__(self, message: str) -> None:
        self.message = message


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses an undecodable request with INVALID_ARGUMENT rather than grpc's UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        message_type = getattr(decode, "__self__", None)
        descriptor = getattr(message_type, "DESCRIPTOR", None)
        name = descriptor.full_name if isinstance(descriptor, Descriptor) else "request"

        def deserialize(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError as e:
                field = _bad_utf8_field(data, descriptor) if descriptor is not None else None
                what = f"{field}: not valid UTF-8" if field else f"not a valid {name}: {e}"
                return _Undecodable(what)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream), deserialize, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _stream(handler.stream_unary), deserialize, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream_stream(handler.stream_stream), deserialize, handler.response_serializer
        )


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _unary(behavior: Any) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        return await behavior(request, context)

    return call


# A streaming handler is either an async generator or a coroutine that writes through
# its context (grpc.aio runs each by its kind): each wrapper keeps the kind it wraps.


def _unary_stream(behavior: Any) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        return _unary(behavior)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        async for response in behavior(request, context):
            yield response

    return call


def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
             ) -> AsyncIterator[Any]:  # fmt: skip
    async def checked() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            yield request

    return checked()


def _stream(behavior: Any) -> Any:
    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_checked(requests, context), context)

    return call


def _stream_stream(behavior: Any) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        return _stream(behavior)

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[Any]:  # fmt: skip
        async for response in behavior(_checked(requests, context), context):
            yield response

    return call


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _bad_utf8_field(data: bytes, descriptor: Descriptor, depth: int = 0) -> str | None:
    """The dotted name of the first string field holding invalid UTF-8, if one does."""
    if depth > 16:
        return None
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return str(field.name)
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type:
                    inner = _bad_utf8_field(chunk, field.message_type, depth + 1)
                    if inner is not None:
                        return f"{field.name}.{inner}"
            else:
                return None
    except ValueError:
        return None
    return None
