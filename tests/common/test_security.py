"""TLS, mTLS and bearer tokens on real in-process gRPC servers, with certificates made in the test."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import channels, pb
from services.common.auth import ADMIN_METHODS, READ_ONLY_METHODS
from services.common.grpc_server import GrpcServer
from services.common.pki import Pki, make_pki
from services.common.process import free_port
from services.common.security import AuthSettings, SecurityError, TlsSettings
from services.common.settings import ServiceSettings

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"


class Serving(pb.serving_grpc.ServingServiceServicer):
    """Answers every call: these tests are about who gets through, not what the service does."""

    async def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        return pb.serving.GetModelResponse()

    async def LoadModel(self, request, context):  # type: ignore[no-untyped-def]
        return pb.serving.LoadModelResponse()

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        yield pb.serving.GenerateResponse()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _server(tls: TlsSettings, auth: AuthSettings | None = None) -> GrpcServer:
    server = GrpcServer("serving", ServiceSettings(tls=tls, auth=auth or AuthSettings()))
    pb.serving_grpc.add_ServingServiceServicer_to_server(Serving(), server.server)
    server.add_service_name("distillery.serving.v1.ServingService")
    await server.start(metrics=False)
    return server


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[GrpcServer]:
    server = await _server(TlsSettings(server_cert=pki.server_cert, server_key=pki.server_key))
    yield server
    await server.stop(0)


async def _get_model(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await pb.serving_grpc.ServingServiceStub(channel).GetModel(pb.serving.GetModelRequest(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


async def test_tls_handshake_with_the_test_ca(tls_server: GrpcServer, pki: Pki) -> None:
    async with channels.aio_channel(tls_server.address, tls=TlsSettings(ca=pki.ca)) as channel:
        assert await _get_model(channel) == grpc.StatusCode.OK
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_tls_server_refuses_plain_text_and_an_untrusted_ca(tls_server: GrpcServer, pki: Pki) -> None:
    async with channels.aio_channel(tls_server.address, tls=TlsSettings()) as channel:
        assert await _get_model(channel) == grpc.StatusCode.UNAVAILABLE
    async with channels.aio_channel(tls_server.address, tls=TlsSettings(ca=pki.other_ca)) as channel:
        assert await _get_model(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    tls = TlsSettings(server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca)
    server = await _server(tls)
    try:
        async with channels.aio_channel(server.address, tls=TlsSettings(ca=pki.ca)) as channel:
            assert await _get_model(channel) == grpc.StatusCode.UNAVAILABLE
        mine = TlsSettings(ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        async with channels.aio_channel(server.address, tls=mine) as channel:
            assert await _get_model(channel) == grpc.StatusCode.OK
    finally:
        await server.stop(0)


@pytest.fixture
async def token_server(pki: Pki) -> AsyncIterator[GrpcServer]:
    server = await _server(
        TlsSettings(server_cert=pki.server_cert, server_key=pki.server_key),
        AuthSettings(admin_token=ADMIN, read_token=READ),
    )
    yield server
    await server.stop(0)


def _client(pki: Pki, token: str | None) -> AuthSettings:
    return AuthSettings(token=token) if token else AuthSettings()


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef"])
async def test_missing_or_wrong_token_is_unauthenticated(token_server: GrpcServer, pki: Pki, token: str) -> None:
    async with channels.aio_channel(token_server.address, tls=TlsSettings(ca=pki.ca), auth=_client(pki, token)) as c:
        assert await _get_model(c) == grpc.StatusCode.UNAUTHENTICATED
        stream = pb.serving_grpc.ServingServiceStub(c).Generate(pb.serving.GenerateRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes and discovery need no token.
        assert await _health(c) == health_pb2.HealthCheckResponse.SERVING


async def test_read_only_token_reads_but_is_denied_admin_rpcs(token_server: GrpcServer, pki: Pki) -> None:
    async with channels.aio_channel(token_server.address, tls=TlsSettings(ca=pki.ca), auth=_client(pki, READ)) as c:
        stub = pb.serving_grpc.ServingServiceStub(c)
        assert await _get_model(c) == grpc.StatusCode.OK
        assert [r async for r in stub.Generate(pb.serving.GenerateRequest(), timeout=10)]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.LoadModel(pb.serving.LoadModelRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "LoadModel" in (info.value.details() or "")


async def test_admin_token_reaches_admin_rpcs(token_server: GrpcServer, pki: Pki) -> None:
    async with channels.aio_channel(token_server.address, tls=TlsSettings(ca=pki.ca), auth=_client(pki, ADMIN)) as c:
        await pb.serving_grpc.ServingServiceStub(c).LoadModel(pb.serving.LoadModelRequest(), timeout=10)
        assert await _get_model(c) == grpc.StatusCode.OK


async def test_token_over_plain_text_loopback(pki: Pki) -> None:
    server = await _server(TlsSettings(), AuthSettings(admin_token=ADMIN))
    try:
        async with channels.aio_channel(server.address, tls=TlsSettings(), auth=_client(pki, ADMIN)) as c:
            assert await _get_model(c) == grpc.StatusCode.OK
        async with channels.aio_channel(server.address, tls=TlsSettings(), auth=AuthSettings()) as c:
            assert await _get_model(c) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)


async def test_health_port_answers_probes_in_plain_text_and_nothing_else(pki: Pki) -> None:
    health_port = free_port()
    tls = TlsSettings(server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca, health_port=health_port)
    server = await _server(tls, AuthSettings(admin_token=ADMIN))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await _get_model(channel) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


def test_every_rpc_is_classified() -> None:
    listed = set()
    for module, service in ((pb.teacher, "TeacherService"), (pb.trainer, "TrainerService"),
                            (pb.serving, "ServingService")):  # fmt: skip
        descriptor = module.DESCRIPTOR.services_by_name[service]
        listed |= {f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods}
    assert listed == READ_ONLY_METHODS | ADMIN_METHODS
    assert not READ_ONLY_METHODS & ADMIN_METHODS


def test_plain_text_on_a_public_address_is_refused() -> None:
    async def start() -> None:
        # Built inside the loop: grpc.aio binds a server to the running loop (outside one it asks asyncio for the
        # default loop, which an earlier asyncio.run in this thread has unset).
        server = GrpcServer("serving", ServiceSettings(host="0.0.0.0", tls=TlsSettings()))
        await server.start(metrics=False)

    with pytest.raises(SecurityError, match="ALLOW_INSECURE"):
        asyncio.run(start())


def test_a_token_is_never_sent_in_plain_text_over_the_network() -> None:
    with pytest.raises(SecurityError, match="only over TLS"):
        channels.credentials("10.0.0.7:50053", TlsSettings(), AuthSettings(token=ADMIN))


def test_settings_validation(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="server_key"):
        TlsSettings(server_cert=pki.server_cert)
    with pytest.raises(ValueError, match="mTLS"):
        TlsSettings(client_ca=pki.ca)
    with pytest.raises(SecurityError, match="admin_token"):
        AuthSettings(read_token=READ).server_tokens()
    with pytest.raises(SecurityError, match="16 characters"):
        AuthSettings(admin_token="short").server_tokens()
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    assert AuthSettings(admin_token_file=token_file).server_tokens() == (ADMIN, None)
    assert AuthSettings(admin_token_file=token_file).client_token() == ADMIN
    with pytest.raises(SecurityError, match="cannot be read"):
        TlsSettings(ca=tmp_path / "missing.crt").channel_credentials()


def test_every_client_channel_comes_from_the_factory() -> None:
    """One place makes channels, so one set of variables secures every client; a new client must use it too."""
    root = Path(__file__).resolve().parents[2] / "services"
    pattern = re.compile(r"grpc\.(aio\.)?(insecure|secure)_channel\(")
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "gen" not in path.relative_to(root).parts[:2]
        and path.name != "channels.py"
        and pattern.search(path.read_text())
    ]
    assert offenders == []
