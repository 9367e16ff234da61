"""TrainerService over gRPC: translation between protos and the run manager, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from services.common import pb
from services.common.errors import FailedPrecondition, grpc_method
from services.common.kafka import ProtoProducer
from services.common.registry import Checkpoint, CheckpointError, Registry, verify
from services.common.text import clip
from services.trainer import metrics
from services.trainer.checkpoint import checkpoint_event, checkpoint_proto
from services.trainer.runs import RunManager


class TrainerServicer(pb.trainer_grpc.TrainerServiceServicer):  # type: ignore[misc]
    def __init__(self, manager: RunManager, registry: Registry, producer: ProtoProducer, topic: str) -> None:
        self.manager = manager
        self.registry = registry
        self.producer = producer
        self.topic = topic

    @grpc_method("trainer")
    async def StartRun(
        self, request: pb.trainer.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.trainer.StartRunResponse:
        info = await asyncio.to_thread(self.manager.start_run, request.spec)
        return pb.trainer.StartRunResponse(run=info)

    @grpc_method("trainer")
    async def GetRun(
        self, request: pb.trainer.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.trainer.GetRunResponse:
        return pb.trainer.GetRunResponse(run=self.manager.get(request.run_id))

    @grpc_method("trainer")
    async def WatchRun(
        self, request: pb.trainer.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.trainer.WatchRunResponse]:
        self.manager.get(request.run_id)  # NOT_FOUND before the stream starts
        async for progress in self.manager.watch(request.run_id):
            yield pb.trainer.WatchRunResponse(progress=progress)

    @grpc_method("trainer")
    async def StopRun(
        self, request: pb.trainer.StopRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.trainer.StopRunResponse:
        return pb.trainer.StopRunResponse(run=self.manager.stop(request.run_id, request.evaluate))

    @grpc_method("trainer")
    async def ListCheckpoints(
        self, request: pb.trainer.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.trainer.ListCheckpointsResponse:
        found = await asyncio.to_thread(self.manager.checkpoints, request.run_id, request.promoted_only)
        promoted = set(self.registry.promoted_versions())
        return pb.trainer.ListCheckpointsResponse(
            checkpoints=[checkpoint_proto(c, c.version in promoted) for c in found]
        )

    @grpc_method("trainer")
    async def PromoteCheckpoint(
        self, request: pb.trainer.PromoteCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.trainer.PromoteCheckpointResponse:
        ckpt = await asyncio.to_thread(self._promote, request)
        return pb.trainer.PromoteCheckpointResponse(checkpoint=checkpoint_proto(ckpt, True))

    def _promote(self, request: pb.trainer.PromoteCheckpointRequest) -> Checkpoint:
        """Promotes a checkpoint this trainer wrote: it must be in its registry and belong to one of its runs."""
        path = self.registry.find_requested(request)
        try:
            ckpt = verify(path)
        except CheckpointError as exc:
            raise FailedPrecondition(f"checkpoint {path.name} fails verification: {exc}") from exc
        if not self.manager.wrote(ckpt):
            raise FailedPrecondition(
                f"checkpoint {path.name} belongs to run {clip(ckpt.manifest.run_id)}, which is not a run of this "
                "trainer: it promotes only what it wrote"
            )
        # Announced first, marked promoted only once the broker acknowledged it: the registry never lists a promotion
        # serving was not told about (a failed announcement fails the call, and nothing is promoted).
        self.producer.send_and_wait(self.topic, ckpt.manifest.run_id, checkpoint_event(ckpt, True), timeout_s=30)
        self.registry.promote(ckpt)
        metrics.CHECKPOINTS_PROMOTED.inc()
        return ckpt
