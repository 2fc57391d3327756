"""``levante.Client``: the Engine API from Python, with typed results.

gRPC errors are translated at this boundary into Levante's error tree (errors.py),
so callers catch ``NotFoundError`` rather than inspecting status codes. A client sends a
bearer token (``token=``) with every call and speaks TLS when given a CA (``tls_ca=``,
to verify the server) or a client certificate (``tls_cert=`` and ``tls_key=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

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
from levante.rpc.auth import ClientCredentials
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

FINAL_STATES = frozenset({"SUCCESS", "ERROR", "CANCELLED"})

_ERROR_BY_STATUS: dict[grpc.StatusCode, type[LevanteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.UNAVAILABLE: StoreError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


class EngineUnavailableError(LevanteError):
    """The engine could not be reached."""


def _translate(error: grpc.aio.AioRpcError) -> LevanteError:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (error.details() or "").lower():
        return EngineUnavailableError(error.details() or "engine unavailable")
    cls = _ERROR_BY_STATUS.get(code, LevanteError)
    return cls(error.details() or code.name)


def _loads(text: str) -> Any:
    return None if text == "" else json.loads(text)


@dataclass(frozen=True)
class TaskInfo:
    id: str
    name: str
    state: str
    state_info: str
    action: str
    published: Any
    result: Any
    attempt: int
    assignment_id: str


@dataclass(frozen=True)
class ExecutionInfo:
    id: str
    workflow: str
    state: str
    state_info: str
    input: Any
    output: Any
    tasks: tuple[TaskInfo, ...]
    definition: str = ""  # the workflow's YAML, from get_status(..., include_definition=True)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def tasks_named(self, name: str) -> list[TaskInfo]:
        return [t for t in self.tasks if t.name == name]


@dataclass(frozen=True)
class ExecutionSummary:
    id: str
    workflow: str
    state: str
    state_info: str
    created_at: float
    parent_task_id: str


@dataclass(frozen=True)
class ExecutionEvent:
    """One state change (or, with cause "current", how things stood when a watch began)."""

    seq: int
    at: float
    kind: str
    execution_id: str
    task_id: str
    task_name: str
    state: str
    state_info: str
    cause: str


def _event(e: pb.ExecutionEvent) -> ExecutionEvent:
    return ExecutionEvent(
        seq=e.seq, at=e.at.ToNanoseconds() / 1e9, kind=e.kind, execution_id=e.execution_id,
        task_id=e.task_id, task_name=e.task_name, state=e.state, state_info=e.state_info,
        cause=e.cause,
    )  # fmt: skip


def execution_info(status: pb.ExecutionStatus) -> ExecutionInfo:
    return ExecutionInfo(
        id=status.execution_id,
        workflow=status.workflow,
        state=status.state,
        state_info=status.state_info,
        input=_loads(status.input_json),
        output=_loads(status.output_json),
        tasks=tuple(
            TaskInfo(
                id=t.id,
                name=t.name,
                state=t.state,
                state_info=t.state_info,
                action=t.action,
                published=_loads(t.published_json),
                result=_loads(t.result_json),
                attempt=t.attempt,
                assignment_id=t.assignment_id,
            )
            for t in status.tasks
        ),
        definition=status.definition,
    )


class Client:
    """An asyncio client of one engine. Use as ``async with Client("127.0.0.1:50051")``."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.target = target
        credentials = ClientCredentials.from_files(token, tls_ca, tls_cert, tls_key)
        self._metadata = credentials.metadata or None
        self._channel = credentials.channel(target)
        self._engine = pb_grpc.EngineStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = 30.0) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _translate(e) from None

    async def register_workflows(self, definition: str) -> list[str]:
        response = await self._call(
            self._engine.RegisterWorkflows, pb.RegisterWorkflowsRequest(definition=definition)
        )
        return list(response.workflows)

    async def run(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        definition: str = "",
        request_id: str = "",
    ) -> str:
        response = await self._call(
            self._engine.Run,
            pb.RunRequest(
                workflow=workflow,
                definition=definition,
                input_json=json.dumps(dict(input or {})),
                params_json=json.dumps(dict(params or {})),
                request_id=request_id,
            ),
        )
        return str(response.execution_id)

    async def task_complete(
        self, task_id: str, *, result: Any = None, error: Any = None, failed: bool = False
    ) -> None:
        if failed or error is not None:
            request = pb.TaskCompleteRequest(task_id=task_id, error_json=json.dumps(error))
        else:
            request = pb.TaskCompleteRequest(task_id=task_id, result_json=json.dumps(result))
        await self._call(self._engine.TaskComplete, request)

    async def get_status(
        self, execution_id: str, *, include_definition: bool = False
    ) -> ExecutionInfo:
        status = await self._call(
            self._engine.GetStatus,
            pb.GetStatusRequest(execution_id=execution_id, include_definition=include_definition),
        )
        return execution_info(status)

    async def pause(self, execution_id: str) -> ExecutionInfo:
        request = pb.PauseExecutionRequest(execution_id=execution_id)
        return execution_info(await self._call(self._engine.PauseExecution, request))

    async def resume(self, execution_id: str) -> ExecutionInfo:
        request = pb.ResumeExecutionRequest(execution_id=execution_id)
        return execution_info(await self._call(self._engine.ResumeExecution, request))

    async def cancel(self, execution_id: str, reason: str = "") -> ExecutionInfo:
        request = pb.CancelExecutionRequest(execution_id=execution_id, reason=reason)
        return execution_info(await self._call(self._engine.CancelExecution, request))

    async def rerun(self, execution_id: str, task_name: str) -> ExecutionInfo:
        request = pb.RerunTaskRequest(execution_id=execution_id, task_name=task_name)
        return execution_info(await self._call(self._engine.RerunTask, request))

    async def list_executions(
        self, *, state: str = "", workflow: str = "", page_size: int = 50, page_token: str = ""
    ) -> tuple[list[ExecutionSummary], str]:
        """One page of executions, newest first, and the token of the next page ("" at the end)."""
        response = await self._call(
            self._engine.ListExecutions,
            pb.ListExecutionsRequest(state=state, workflow=workflow, page_size=page_size,
                                     page_token=page_token),
        )  # fmt: skip
        found = [
            ExecutionSummary(e.execution_id, e.workflow, e.state, e.state_info,
                             e.created_at.ToNanoseconds() / 1e9, e.parent_task_id)
            for e in response.executions
        ]  # fmt: skip
        return found, str(response.next_page_token)

    async def history(self, execution_id: str) -> list[ExecutionEvent]:
        response = await self._call(
            self._engine.GetHistory, pb.GetHistoryRequest(execution_id=execution_id)
        )
        return [_event(e) for e in response.events]

    async def watch(self, execution_id: str) -> AsyncGenerator[ExecutionEvent, None]:
        """The current state, then each change as it happens, until the execution ends."""
        call = self._engine.WatchExecution(
            pb.WatchExecutionRequest(execution_id=execution_id), metadata=self._metadata
        )
        try:
            async for event in call:
                yield _event(event)
        except grpc.aio.AioRpcError as e:
            raise _translate(e) from None
        finally:
            call.cancel()

    async def wait(self, execution_id: str, timeout: float = 60.0) -> ExecutionInfo:
        """The execution's status once it is final; TimeoutError after ``timeout``.

        Follows WatchExecution, which pushes each change, rather than polling GetStatus:
        a status lists every task, and polling it costs a large execution's engine more
        with every step (a 10,000-step chain ran at 7.2 ms a step, not 3, while a client
        polled it every 50 ms)."""
        try:
            async with asyncio.timeout(timeout), contextlib.aclosing(
                self.watch(execution_id)
            ) as events:
                async for _ in events:
                    pass  # the stream ends when the execution does
        except TimeoutError:
            info = await self.get_status(execution_id)
            if not info.is_final:
                raise TimeoutError(
                    f"execution {execution_id} still {info.state} after {timeout}s"
                ) from None
            return info
        return await self.get_status(execution_id)


class SyncClient:
    """The synchronous twin of Client, for scripts."""

    def __init__(self, target: str, **options: Any) -> None:
        """``options``: Client's (token, tls_ca, tls_cert, tls_key)."""
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(self._make(target, options))

    @staticmethod
    async def _make(target: str, options: dict[str, Any]) -> Client:
        return Client(target, **options)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def register_workflows(self, definition: str) -> list[str]:
        return self._loop.run_until_complete(self._client.register_workflows(definition))

    def run(self, workflow: str, input: Mapping[str, Any] | None = None, **kw: Any) -> str:
        return self._loop.run_until_complete(self._client.run(workflow, input, **kw))

    def task_complete(self, task_id: str, **kw: Any) -> None:
        self._loop.run_until_complete(self._client.task_complete(task_id, **kw))

    def get_status(self, execution_id: str) -> ExecutionInfo:
        return self._loop.run_until_complete(self._client.get_status(execution_id))

    def wait(self, execution_id: str, timeout: float = 60.0) -> ExecutionInfo:
        return self._loop.run_until_complete(self._client.wait(execution_id, timeout))

    def pause(self, execution_id: str) -> ExecutionInfo:
        return self._loop.run_until_complete(self._client.pause(execution_id))

    def resume(self, execution_id: str) -> ExecutionInfo:
        return self._loop.run_until_complete(self._client.resume(execution_id))

    def cancel(self, execution_id: str, reason: str = "") -> ExecutionInfo:
        return self._loop.run_until_complete(self._client.cancel(execution_id, reason))

    def rerun(self, execution_id: str, task_name: str) -> ExecutionInfo:
        return self._loop.run_until_complete(self._client.rerun(execution_id, task_name))

    def list_executions(self, **kw: Any) -> tuple[list[ExecutionSummary], str]:
        return self._loop.run_until_complete(self._client.list_executions(**kw))

    def history(self, execution_id: str) -> list[ExecutionEvent]:
        return self._loop.run_until_complete(self._client.history(execution_id))

    def watch(self, execution_id: str) -> Iterator[ExecutionEvent]:
        """The current state, then each change, until the execution ends (blocking)."""
        events = self._client.watch(execution_id)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(events))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(events.aclose())
