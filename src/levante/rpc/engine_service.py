"""The Engine service: a thin adapter from protobuf requests to the lazy Engine."""

from __future__ import annotations

import grpc

from levante.engine import Engine
from levante.errors import InvalidArgumentError
from levante.ids import AssignmentId, ExecutionId
from levante.rpc import messages
from levante.rpc.status import translate_errors
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc


class EngineService(pb_grpc.EngineServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

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
        return messages.execution_status(execution, tasks)
