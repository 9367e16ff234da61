"""The security component: certificates and tokens from Secrets reach every service at the paths its settings read,
probes still reach health, and the base says plainly that it is plain text."""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

import pytest

from services.common.security import AuthSettings, TlsSettings
from tests.deploy.render import OVERLAYS, config_map, env_of, of_kind, one, render

SECURE = "prod"


def _mounted_files(objects: tuple[dict[str, Any], ...], deployment: dict[str, Any]) -> dict[str, str]:
    """Mount path of each Secret volume the first container mounts -> the Secret's name."""
    pod = deployment["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    return {m["mountPath"]: secrets[m["name"]] for m in pod["containers"][0]["volumeMounts"] if m["name"] in secrets}


def test_every_service_gets_tls_and_tokens_from_secrets(kubectl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(kubectl, f"overlays/{SECURE}")
    certificate = one(objects, "Certificate", "distillery-grpc")
    secret_of_cert = certificate["spec"]["secretName"]
    for deployment in of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        env = env_of(objects, deployment)
        for key in [k for k in os.environ if k.startswith("DISTILLERY_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        tls, auth = TlsSettings(), AuthSettings()
        assert tls.allow_insecure is False and tls.server_tls and tls.client_ca is not None, name
        assert auth.admin_token_file is not None and auth.read_token_file is not None, name
        mounts = _mounted_files(objects, deployment)
        for path in (tls.server_cert, tls.server_key, tls.client_ca, tls.ca, tls.client_cert, tls.client_key):
            assert mounts.get(str(PurePosixPath(str(path)).parent)) == secret_of_cert, f"{name}: {path} not mounted"
        for path in (auth.admin_token_file, auth.read_token_file):
            assert mounts.get(str(PurePosixPath(str(path)).parent)) == "distillery-auth", f"{name}: {path}"
        # The kubelet's grpc probe cannot speak TLS: it asks the plain-text health-only port.
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert tls.health_port is not None
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == tls.health_port, f"{name} {probe}"
        # The certificate names the Service clients dial.
        assert name in certificate["spec"]["dnsNames"]


def test_the_certificate_chain_is_issued_in_the_namespace(kubectl: str) -> None:
    objects = render(kubectl, f"overlays/{SECURE}")
    issuers = {o["metadata"]["name"]: o["spec"] for o in of_kind(objects, "Issuer")}
    certificates = {o["metadata"]["name"]: o["spec"] for o in of_kind(objects, "Certificate")}
    assert certificates["distillery-ca"]["isCA"] is True
    assert "selfSigned" in issuers[certificates["distillery-ca"]["issuerRef"]["name"]]
    grpc_issuer = issuers[certificates["distillery-grpc"]["issuerRef"]["name"]]
    assert grpc_issuer["ca"]["secretName"] == certificates["distillery-ca"]["secretName"]
    assert {"server auth", "client auth"} <= set(certificates["distillery-grpc"]["usages"])


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != SECURE])
def test_plain_text_overlays_say_so(kubectl: str, overlay: str) -> None:
    security = config_map(render(kubectl, f"overlays/{overlay}"), "security-config")
    assert security == {"DISTILLERY_TLS_ALLOW_INSECURE": "true"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_config_keys_are_settings_fields(kubectl: str, overlay: str) -> None:
    """A misspelt key would be ignored silently (`extra="ignore"`): look each one up."""
    for key in config_map(render(kubectl, f"overlays/{overlay}"), "security-config"):
        for prefix, cls in (("DISTILLERY_TLS_", TlsSettings), ("DISTILLERY_AUTH_", AuthSettings)):
            if key.startswith(prefix):
                assert key[len(prefix) :].lower() in cls.model_fields, key
                break
        else:
            pytest.fail(f"security-config sets {key}, which no distillery settings read")
