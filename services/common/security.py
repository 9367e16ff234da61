"""TLS and token settings shared by every gRPC server and client, and the credentials built from them.

One set of variables serves a whole process tree: `DISTILLERY_TLS_*` and `DISTILLERY_AUTH_*` give a service its
certificate and the tokens it accepts, and give a client (CLI, demo, load generator, benches) the CA it trusts, its
own certificate for mTLS and the token it sends. A service started by the demo inherits the demo's variables.
Plain text on 127.0.0.1 stays the default; a server on any other address refuses to start without TLS unless
`DISTILLERY_TLS_ALLOW_INSECURE=true` says so.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

#: Shorter tokens are refused: a token is a shared secret, not a password someone types.
MIN_TOKEN_CHARS = 16


class SecurityError(ValueError):
    """A TLS or token setting cannot be used (a file that cannot be read, a plaintext public bind)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"{what}={path}: cannot be read ({exc.strerror or exc})") from None


class TlsSettings(BaseSettings):
    """TLS for gRPC (env prefix `DISTILLERY_TLS_`). PEM files; a Kubernetes Secret mounted as a folder fits."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_TLS_", extra="ignore")

    server_cert: Path | None = None
    """Servers: certificate chain. Set (with `server_key`): the gRPC port speaks TLS only."""
    server_key: Path | None = None
    """Servers: private key of `server_cert`."""
    client_ca: Path | None = None
    """Servers: CA bundle that signs client certificates. Set: every client must present one (mTLS)."""
    ca: Path | None = None
    """Clients: CA bundle that signs the servers' certificates. Set: clients connect with TLS."""
    client_cert: Path | None = None
    """Clients: certificate presented to servers that require mTLS (with `client_key`)."""
    client_key: Path | None = None
    """Clients: private key of `client_cert`."""
    use_tls: bool = False
    """Clients: connect with TLS even without `ca` (the system's root CAs then verify the server)."""
    server_name: str | None = None
    """Clients: the name the server's certificate must carry when it differs from the address's host."""
    allow_insecure: bool = False
    """Servers: allow plain-text gRPC on a non-loopback address (logged as a warning). Without it such a server
    refuses to start."""
    health_port: int | None = Field(None, ge=1, le=65535)
    """Servers: a second, plain-text port that serves only grpc.health.v1, for Kubernetes `grpc:` probes (which
    cannot speak TLS). Unset: none."""

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.server_cert is None) != (self.server_key is None):
            raise ValueError("server_cert and server_key: set both or neither")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key: set both or neither")
        if self.client_ca is not None and self.server_cert is None:
            raise ValueError("client_ca (mTLS) needs server_cert and server_key: mTLS runs over TLS")
        return self

    @property
    def server_tls(self) -> bool:
        return self.server_cert is not None

    @property
    def client_tls(self) -> bool:
        return self.use_tls or self.ca is not None or self.client_cert is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for a server port (client certificates required when `client_ca` is set), or None."""
        if self.server_cert is None or self.server_key is None:
            return None
        pair = (_read(self.server_key, "server_key"), _read(self.server_cert, "server_cert"))
        if self.client_ca is None:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(self.client_ca, "client_ca"), require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for a client channel (with a client certificate when given), or None for plain text."""
        if not self.client_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "ca") if self.ca else None,
            private_key=_read(self.client_key, "client_key") if self.client_key else None,
            certificate_chain=_read(self.client_cert, "client_cert") if self.client_cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.client_tls else []


class AuthSettings(BaseSettings):
    """Bearer tokens for gRPC (env prefix `DISTILLERY_AUTH_`). No admin token: no token is checked."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_AUTH_", extra="ignore")

    admin_token: SecretStr | None = None
    """Servers: the token every RPC accepts (StartRun, StopRun, PromoteCheckpoint, LoadModel need it)."""
    admin_token_file: Path | None = None
    """Servers: a file holding the admin token (a mounted Secret); read at start-up."""
    read_token: SecretStr | None = None
    """Servers: a token for read-only RPCs only (Generate, Score, GetModel, GetRun, WatchRun, ListCheckpoints)."""
    read_token_file: Path | None = None
    token: SecretStr | None = None
    """Clients: the token sent as `authorization: Bearer ...`; default: the admin token, else the read-only one."""
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AuthSettings:
        for name in ("admin_token", "read_token", "token"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"{name} and {name}_file: set one, not both")
        return self

    def _resolve(self, name: str) -> str | None:
        value: SecretStr | None = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        text = value.get_secret_value() if value is not None else None
        if path is not None:
            text = _read(path, f"{name}_file").decode("utf-8", errors="strict").strip()
        if text is None:
            return None
        if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
            raise SecurityError(f"{name}: a token has at least {MIN_TOKEN_CHARS} characters and no spaces")
        return text

    def server_tokens(self) -> tuple[str | None, str | None]:
        """(admin token, read-only token) a server accepts; (None, None) when tokens are off."""
        admin, read = self._resolve("admin_token"), self._resolve("read_token")
        if read is not None and admin is None:
            raise SecurityError("read_token without admin_token: admin RPCs would accept anyone; set admin_token")
        return admin, read

    def client_token(self) -> str | None:
        return self._resolve("token") or self._resolve("admin_token") or self._resolve("read_token")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def bind_port(server: grpc.aio.Server, host: str, port: int, tls: TlsSettings, name: str) -> int:
    """Adds the service's port: TLS when a server certificate is set; plain text only on loopback or when
    `allow_insecure` says so. Returns the bound port (0 when binding failed)."""
    address = f"{host}:{port}"
    credentials = tls.server_credentials()
    if credentials is not None:
        logger.info("%s gRPC uses TLS", name, extra={"mtls": tls.client_ca is not None})
        return server.add_secure_port(address, credentials)
    if not is_loopback(host):
        if not tls.allow_insecure:
            raise SecurityError(
                f"{name}: refusing plain-text gRPC on {address} (not a loopback address). Set "
                "DISTILLERY_TLS_SERVER_CERT and DISTILLERY_TLS_SERVER_KEY, or DISTILLERY_TLS_ALLOW_INSECURE=true "
                "to accept plain text on the network"
            )
        logger.warning("%s gRPC is plain text on %s (DISTILLERY_TLS_ALLOW_INSECURE=true)", name, address)
    return server.add_insecure_port(address)


async def start_probe_server(health: HealthServicer, host: str, port: int) -> grpc.aio.Server:
    """A plain-text server with only grpc.health.v1 (the service's own health servicer), for Kubernetes `grpc:`
    probes, which cannot speak TLS. It reveals only SERVING / NOT_SERVING."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"could not bind the health port {host}:{port}")
    await server.start()
    logger.info("plain-text health-only port for probes", extra={"health_port": port})
    return server
