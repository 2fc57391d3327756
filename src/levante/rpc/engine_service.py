"""The Engine service: a thin adapter from protobuf requests to the lazy Engine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Collection

import grpc

from levante.core.model import ExecutionRecord
from levante.engine import Engine
from levante.errors import InvalidArgumentError, LevanteError
from levante.ids import AssignmentId, ExecutionId
from levante.limits import check_json_text
from levante.rpc import messages
from levante.rpc.status import status_for, translate_errors
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

WATCH_RECHECK_SECONDS = 0.25  # another replica's changes are noticed at least this often
MAX_PAGE_SIZE = 1000


class ChangeFeed:
    """Wakes watchers of an execution when a commit in this process changed it."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Event]] = {}

    def publish(self, execution_ids: Collection[str]) -> None:
        for execution_id in execution_ids:
            for event in self._watchers.get(execution_id, ()):
                event.set()

    @contextlib.contextmanager
    def watch(self, execution_id: str):  # type: ignore[no-untyped-def]
        event = asyncio.Event()
        self._watchers.setdefault(execution_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(execution_id, set())
            watchers.discard(event)
            if not watchers:
                self._watchers.pop(execution_id, None)


def _page_token(execution: ExecutionRecord) -> str:
    raw = f"{execution.created_at!r}|{execution.id}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _parse_page_token(token: str) -> tuple[float, str]:
    try:
        created_at, execution_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(created_at), execution_id
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgumentError("page_token: not a token this server gave out") from e


class EngineService(pb_grpc.EngineServicer):
    def __init__(self, engine: Engine, changes: ChangeFeed | None = None) -> None:
        self._engine = engine
        self._changes = changes or ChangeFeed()

    async def _status(self, execution_id: ExecutionId) -> pb.ExecutionStatus:
        execution, tasks = await self._engine.get_status(execution_id)
        return messages.execution_status(execution, tasks)

    @translate_errors
    async def RegisterWorkflows(
        self, request: pb.RegisterWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterWorkflowsResponse:
        if not request.definition.strip():
            raise InvalidArgumentError("definition: empty")
        names = await self._engine.register(request.definition)
        return pb.RegisterWorkflowsResponse(workflows=names)

    @translate_errors
    async def Run(
        self, request: pb.RunRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunResponse:
        for field in ("input_json", "params_json"):  # bounded before they are decoded
            check_json_text(getattr(request, field), field, "input_bytes", self._engine.limits)
        workflow_input = messages.parse_json_object(request.input_json, "input_json")
        params = messages.parse_json_object(request.params_json, "params_json")
        execution_id = await self._engine.run(
            request.workflow,
            workflow_input,
            params,
            request_id=request.request_id or None,
            definition=request.definition or None,
        )
        return pb.RunResponse(execution_id=execution_id)

    @translate_errors
    async def TaskComplete(
        self, request: pb.TaskCompleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskCompleteResponse:
        if not request.task_id:
            raise InvalidArgumentError("task_id: required")
        if (field := request.WhichOneof("outcome")) is not None:
            check_json_text(getattr(request, field), field, "result_bytes", self._engine.limits)
        outcome = messages.outcome_of(request)
        await self._engine.complete(AssignmentId(request.task_id), outcome)
        return pb.TaskCompleteResponse()

    @translate_errors
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutionStatus:
        if not request.execution_id:
            raise InvalidArgumentError("execution_id: required")
        execution, tasks = await self._engine.get_status(ExecutionId(request.execution_id))
        status = messages.execution_status(execution, tasks)
        if request.include_definition:
            status.definition = await self._engine.definition_text(execution.definition_id)
        return status

    @translate_errors
    async def PauseExecution(
        self, request: pb.PauseExecutionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutionStatus:
        execution_id = _required_id(request.execution_id)
        await self._engine.pause(execution_id)
        return await self._status(execution_id)

    @translate_errors
    async def ResumeExecution(
        self, request: pb.ResumeExecutionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutionStatus:
        execution_id = _required_id(request.execution_id)
        await self._engine.resume(execution_id)
        return await self._status(execution_id)

    @translate_errors
    async def CancelExecution(
        self, request: pb.CancelExecutionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutionStatus:
        execution_id = _required_id(request.execution_id)
        await self._engine.cancel(execution_id, request.reason)
        return await self._status(execution_id)

    @translate_errors
    async def RerunTask(
        self, request: pb.RerunTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutionStatus:
        execution_id = _required_id(request.execution_id)
        if not request.task_name:
            raise InvalidArgumentError("task_name: required")
        await self._engine.rerun(execution_id, request.task_name)
        return await self._status(execution_id)

    @translate_errors
    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExecutionsResponse:
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgumentError(f"page_size: must be between 0 and {MAX_PAGE_SIZE}")
        size = request.page_size or 50
        before = _parse_page_token(request.page_token) if request.page_token else None
        found = await self._engine.list_executions(
            state=request.state or None, workflow=request.workflow or None, limit=size + 1,
            before=before,
        )  # fmt: skip
        page = found[:size]
        token = _page_token(page[-1]) if len(found) > size else ""
        return pb.ListExecutionsResponse(
            executions=[messages.execution_summary(e) for e in page], next_page_token=token
        )

    @translate_errors
    async def GetHistory(
        self, request: pb.GetHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetHistoryResponse:
        execution_id = _required_id(request.execution_id)
        entries = await self._engine.history(execution_id)
        return pb.GetHistoryResponse(events=[messages.history_event(e) for e in entries])

    async def WatchExecution(
        self, request: pb.WatchExecutionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExecutionEvent]:
        """The current state first, then each change in order, until the execution ends."""
        try:
            execution_id = _required_id(request.execution_id)
            with self._changes.watch(execution_id) as changed:
                # History position first, then the status: a change committed between the
                # two reads is in the status and is sent again from the history (a repeat,
                # never a loss).
                past = await self._engine.history(execution_id)
                last = past[-1].seq if past else 0
                execution, tasks = await self._engine.get_status(execution_id)
                for event in messages.current_events(execution, tasks):
                    yield event
                while not execution.state.is_final:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WATCH_RECHECK_SECONDS):
                            await changed.wait()
                    changed.clear()
                    for entry in await self._engine.history(execution_id, last):
                        last = entry.seq
                        yield messages.history_event(entry)
                    # Whether it has ended: the row alone (reading its tasks after every
                    # change would cost a large execution more with each step).
                    execution = await self._engine.get_execution(execution_id)
                for entry in await self._engine.history(execution_id, last):
                    yield messages.history_event(entry)
        except LevanteError as e:
            code, text = status_for(e)
            await context.abort(code, text)


def _required_id(value: str) -> ExecutionId:
    if not value:
        raise InvalidArgumentError("execution_id: required")
    return ExecutionId(value)
