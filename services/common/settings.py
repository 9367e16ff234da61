"""Settings shared by every service: the Kafka cluster, local state folders, gRPC and metrics endpoints.

Each service subclasses `ServiceSettings` with its own env prefix (`DISTILLERY_TEACHER_`, ...). Kafka settings
are shared by all services and read from `DISTILLERY_KAFKA_*`, so one `DISTILLERY_KAFKA_BOOTSTRAP` points the
whole system at an existing cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.security import AuthSettings, TlsSettings

TOPIC_PROMPTS = "distillery.prompts.v1"
TOPIC_TEACHER_SAMPLES = "distillery.teacher-samples.v1"
TOPIC_CHECKPOINTS = "distillery.checkpoints.v1"
TOPIC_DEAD_LETTERS = "distillery.dead-letters.v1"

#: Average adult silent reading speed for non-fiction, words per minute (Brysbaert 2019).
READING_TARGET_WPM = 238.0


def cpu_list(spec: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5]; a ValueError naming the spec when it is not such a list."""
    cpus: list[int] = []
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"cpu_bind={spec!r} is not a list of cores such as '1', '0-3' or '0,2'") from None
    if not cpus or min(cpus) < 0:
        raise ValueError(f"cpu_bind={spec!r} names no cores")
    return sorted(set(cpus))


def distillery_home() -> Path:
    """Local state (models, registry, embedded broker, demo runs): `$DISTILLERY_HOME`, else `./.distillery`."""
    return Path(os.environ.get("DISTILLERY_HOME", ".distillery")).resolve()


class KafkaSettings(BaseSettings):
    """How every service reaches Kafka (env prefix `DISTILLERY_KAFKA_`)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_KAFKA_", extra="ignore")

    bootstrap: str | None = None
    """Bootstrap servers, e.g. `kafka:9092`. Unset: the embedded broker started by `distillery broker start`."""
    client_id: str = "distillery"
    """Prefix of the Kafka client ids."""
    partitions: int = Field(4, ge=1, le=1024)
    """Partitions of each topic the services create at start-up (existing topics are left as they are)."""
    replication_factor: int = Field(1, ge=1, le=16)
    """Replicas of each topic created at start-up."""
    compression: Literal["zstd", "lz4", "gzip", "none"] = "zstd"
    """Producer compression codec."""
    max_message_bytes: int = Field(1_000_000, ge=1024, le=100_000_000)
    """Largest record value a producer sends; larger ones fail before they reach the broker."""
    linger_ms: int = Field(5, ge=0, le=10_000)
    """Producer batching delay."""
    session_timeout_ms: int = Field(6_000, ge=1_000, le=300_000)
    """Consumer group session timeout; small values make rebalances fast on the embedded broker."""
    heartbeat_interval_ms: int = Field(2_000, ge=100, le=60_000)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    """A consumer that does not poll for this long leaves its group (long batches need a large value)."""
    request_timeout_ms: int = Field(30_000, ge=1_000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How clients talk to the brokers; `SSL`/`SASL_SSL` encrypt, `SASL_*` authenticate with `sasl_mechanism`."""
    ssl_cafile: Path | None = None
    """CA bundle that signs the brokers' certificates (default: the system's)."""
    ssl_certfile: Path | None = None
    """Client certificate for brokers that require mTLS (with `ssl_keyfile`)."""
    ssl_keyfile: Path | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    """User name for the PLAIN and SCRAM mechanisms."""
    sasl_plain_password: SecretStr | None = None
    topic_prompts: str = TOPIC_PROMPTS
    topic_teacher_samples: str = TOPIC_TEACHER_SAMPLES
    topic_checkpoints: str = TOPIC_CHECKPOINTS
    topic_dead_letters: str = TOPIC_DEAD_LETTERS

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and (self.sasl_mechanism is None or not self.sasl_plain_username or not self.sasl_plain_password):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_plain_username and "
                "sasl_plain_password"
            )
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(f"sasl_mechanism={self.sasl_mechanism} needs security_protocol SASL_PLAINTEXT or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile: set both or neither")
        return self

    def client_security(self) -> dict[str, object]:
        """kafka-python keyword arguments for encryption and authentication, shared by every client it builds."""
        kwargs: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_check_hostname"] = True
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if (value := getattr(self, name)) is not None:
                    kwargs[name] = str(value)
        if self.sasl_mechanism is not None and self.sasl_plain_password is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_plain_username
            kwargs["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        return kwargs

    def topics(self) -> list[str]:
        return [self.topic_prompts, self.topic_teacher_samples, self.topic_checkpoints, self.topic_dead_letters]


class ServiceSettings(BaseSettings):
    """Fields every service has; subclasses set `env_prefix` and their default ports."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    """Address the gRPC and metrics servers bind to (`0.0.0.0` in containers)."""
    grpc_port: int = Field(0, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Prometheus `/metrics` port; 0 picks a free one."""
    home: Path = Field(default_factory=distillery_home)
    """Local state folder."""
    registry_dir: Path | None = None
    """Model registry; default `<home>/registry`."""
    models_dir: Path | None = None
    """Prepared base models; default `<home>/models`."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    grace_period_s: float = Field(10.0, ge=0, le=600)
    """On SIGTERM: how long in-flight RPCs get to finish."""
    max_concurrent_rpcs: int = Field(256, ge=2, le=100_000)
    """Requests beyond this are refused with RESOURCE_EXHAUSTED by gRPC itself."""
    max_open_streams: int | None = Field(None, ge=1, le=100_000)
    """Long-lived server streams (Generate, WatchRun) open at once; one more is refused with RESOURCE_EXHAUSTED.
    It must stay below `max_concurrent_rpcs`, so streams can never take the slots health checks need (a liveness
    probe failing on a busy but healthy service). Unset: `max_concurrent_rpcs` less an eighth (at least 16)."""
    max_connection_age_s: float | None = Field(None, gt=0, le=86_400)
    """After about this long the server asks each client connection to go away (HTTP/2 GOAWAY): calls open on it
    finish undisturbed, and the client reconnects for its next one, resolving its target again. That is how clients
    balancing over a headless Service (`dns:///serving-headless:50053`, `round_robin`) find replicas added since
    they connected: gRPC re-resolves DNS only when a connection ends. Unset: connections live as long as clients
    keep them."""
    kafka: KafkaSettings = Field(default_factory=lambda: KafkaSettings())
    tls: TlsSettings = Field(default_factory=lambda: TlsSettings())
    """gRPC TLS and mTLS; read from `DISTILLERY_TLS_*`, shared with the clients of the same process tree."""
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    """gRPC bearer tokens; read from `DISTILLERY_AUTH_*`."""
    kafka_unavailable_s: float = Field(15.0, gt=0, le=3600)
    """A Kafka-bound service (trainer, teacher worker) reports NOT_SERVING on gRPC health once Kafka has been
    unreachable this long, and SERVING again as soon as it is back. Serving ignores it: it keeps serving its model."""
    kafka_check_interval_s: float = Field(2.0, gt=0, le=600)
    """How often a Kafka-bound service checks the broker (and recreates topics that are missing)."""

    @model_validator(mode="after")
    def _streams_leave_room(self) -> ServiceSettings:
        if self.max_open_streams is not None and self.max_open_streams >= self.max_concurrent_rpcs:
            raise ValueError(
                f"max_open_streams={self.max_open_streams} must be below max_concurrent_rpcs={self.max_concurrent_rpcs}"
                " (health checks need room)"
            )
        return self

    @property
    def open_streams_limit(self) -> int:
        """`max_open_streams`, or `max_concurrent_rpcs` less an eighth (at least 16 slots, at least one stream)."""
        if self.max_open_streams is not None:
            return self.max_open_streams
        return max(1, self.max_concurrent_rpcs - max(16, self.max_concurrent_rpcs // 8))

    @property
    def registry(self) -> Path:
        return (self.registry_dir or self.home / "registry").resolve()

    @property
    def models(self) -> Path:
        return (self.models_dir or self.home / "models").resolve()
