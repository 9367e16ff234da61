"""`distillery trainer serve` started with mTLS and tokens from the environment answers a real client: the readiness
check, the CLI's channel factory and the token split all work across processes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.common import channels, pb
from services.common.pki import make_pki
from services.common.process import ServiceProcess
from services.common.security import AuthSettings, TlsSettings
from services.common.settings import KafkaSettings

ADMIN = "e2e-admin-token-0123456789"
READ = "e2e-read-token-0123456789"


@pytest.mark.e2e
def test_trainer_process_with_mtls_and_tokens(
    tiny_teacher: Path, tmp_path: Path, kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = make_pki(tmp_path / "pki")
    kafka = kafka_settings
    # One set of variables for the process tree: the service reads the server side, this test's clients the rest.
    for key, value in {
        "DISTILLERY_TLS_SERVER_CERT": pki.server_cert,
        "DISTILLERY_TLS_SERVER_KEY": pki.server_key,
        "DISTILLERY_TLS_CLIENT_CA": pki.ca,
        "DISTILLERY_TLS_CA": pki.ca,
        "DISTILLERY_TLS_CLIENT_CERT": pki.client_cert,
        "DISTILLERY_TLS_CLIENT_KEY": pki.client_key,
        "DISTILLERY_AUTH_ADMIN_TOKEN": ADMIN,
        "DISTILLERY_AUTH_READ_TOKEN": READ,
        "DISTILLERY_AUTH_TOKEN": READ,
    }.items():
        monkeypatch.setenv(key, str(value))
    env = {
        "DISTILLERY_HOME": str(tmp_path / "home"),
        "DISTILLERY_TRAINER_TEACHER_MODEL": str(tiny_teacher),
        "DISTILLERY_TRAINER_TORCH_THREADS": "1",
        "DISTILLERY_KAFKA_BOOTSTRAP": str(kafka.bootstrap),
        "DISTILLERY_KAFKA_PARTITIONS": str(kafka.partitions),
        "DISTILLERY_KAFKA_TOPIC_PROMPTS": kafka.topic_prompts,
        "DISTILLERY_KAFKA_TOPIC_TEACHER_SAMPLES": kafka.topic_teacher_samples,
        "DISTILLERY_KAFKA_TOPIC_CHECKPOINTS": kafka.topic_checkpoints,
        "DISTILLERY_KAFKA_TOPIC_DEAD_LETTERS": kafka.topic_dead_letters,
    }
    proc = ServiceProcess("trainer", env, tmp_path / "trainer.log")
    proc.start()
    try:
        proc.wait_healthy(180)  # through mTLS, with the certificate from the environment
        with channels.channel(proc.address) as channel:
            stub = pb.trainer_grpc.TrainerServiceStub(channel)
            stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest(), timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                stub.StopRun(pb.trainer.StopRunRequest(run_id="nope"), timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin = AuthSettings(token=ADMIN)
        with channels.channel(proc.address, auth=admin) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb.trainer_grpc.TrainerServiceStub(channel).StopRun(
                    pb.trainer.StopRunRequest(run_id="nope"), timeout=30
                )
            # Past the token check, into the servicer (which knows no such run).
            assert info.value.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        no_cert = TlsSettings(ca=pki.ca, client_cert=None, client_key=None)
        with channels.channel(proc.address, tls=no_cert, auth=admin) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb.trainer_grpc.TrainerServiceStub(channel).ListCheckpoints(
                    pb.trainer.ListCheckpointsRequest(), timeout=30
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop(grace_s=30)
