"""Kafka SSL and SASL settings reach every kafka-python client the services build (producer, consumer, admin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.common import kafka, pb
from services.common.settings import KafkaSettings


class Recorder:
    """Stands in for a kafka-python client class: keeps the keyword arguments it was built with."""

    built: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, **kwargs: Any) -> None:
        Recorder.built.append((type(self).__name__, kwargs))

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: []


class Producer(Recorder): ...


class Consumer(Recorder): ...


class Admin(Recorder): ...


SECURE = {
    "bootstrap": "kafka.example:9093",
    "security_protocol": "SASL_SSL",
    "ssl_cafile": Path("ca.pem"),
    "ssl_certfile": Path("client.pem"),
    "ssl_keyfile": Path("client.key"),
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "distillery",
    "sasl_plain_password": "s3cret-password",
}


def test_ssl_and_sasl_kwargs_reach_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "KafkaProducer", Producer)
    monkeypatch.setattr(kafka, "KafkaConsumer", Consumer)
    monkeypatch.setattr(kafka, "KafkaAdminClient", Admin)
    Recorder.built.clear()
    settings = KafkaSettings(**SECURE)  # type: ignore[arg-type]
    kafka.ProtoProducer(settings, "test")
    kafka.ProtoConsumer(settings, "topic", pb.common.TeacherSample, group_id="g", client_name="test")
    kafka.ensure_topics(settings, ["topic"])
    assert [name for name, _ in Recorder.built] == ["Producer", "Consumer", "Admin"]
    for name, kwargs in Recorder.built:
        assert kwargs["security_protocol"] == "SASL_SSL", name
        assert kwargs["ssl_cafile"] == "ca.pem", name
        assert kwargs["ssl_certfile"] == "client.pem", name
        assert kwargs["ssl_keyfile"] == "client.key", name
        assert kwargs["ssl_check_hostname"] is True, name
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512", name
        assert kwargs["sasl_plain_username"] == "distillery", name
        assert kwargs["sasl_plain_password"] == "s3cret-password", name


def test_plaintext_default_passes_no_tls_files() -> None:
    assert KafkaSettings(bootstrap="b:9092").client_security() == {"security_protocol": "PLAINTEXT"}


def test_sasl_needs_credentials_and_the_password_is_not_printed() -> None:
    with pytest.raises(ValueError, match="sasl_plain_username"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN")
    with pytest.raises(ValueError, match="SASL_PLAINTEXT or SASL_SSL"):
        KafkaSettings(sasl_mechanism="PLAIN")
    assert "s3cret-password" not in repr(KafkaSettings(**SECURE))  # type: ignore[arg-type]
