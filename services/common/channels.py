"""The one place gRPC client channels are made: TLS, mTLS and the bearer token from `DISTILLERY_TLS_*` /
`DISTILLERY_AUTH_*`, plain text by default.

Every client in the project (CLI, demo, load generator, benches, readiness checks) opens its channels here, so one
set of variables secures all of them. A token travels only over TLS or to a loopback address: gRPC's call
credentials need a secure channel, and local credentials are how a plain-text loopback connection counts as one.

Load balancing is gRPC's own, client side: a `dns:///name:port` target resolves to every address of the name (a
Kubernetes headless Service: one per ready pod), and `DISTILLERY_GRPC_LB_POLICY=round_robin` spreads calls over
them. gRPC's default, `pick_first`, sends every call of a channel to one address.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.security import AuthSettings, SecurityError, TlsSettings, is_loopback

Options = Sequence[tuple[str, Any]]


class ClientSettings(BaseSettings):
    """gRPC client behaviour (env prefix `DISTILLERY_GRPC_`)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_GRPC_", extra="ignore")

    lb_policy: Literal["pick_first", "round_robin"] = "pick_first"
    """How a channel spreads calls over the addresses its target resolves to. `round_robin`: call by call over all
    of them (with a `dns:///` target naming a headless Service, over every ready replica); `pick_first`: all calls
    to the first address that connects (gRPC's default)."""

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.lb_policy == "pick_first":
            return []  # gRPC's default: leave a service config's choice alone
        return [("grpc.lb_policy_name", self.lb_policy)]


def _hosts(address: str) -> list[str]:
    """Hosts a target names: one, or several in a multi-address target (`ipv4:127.0.0.1:5001,127.0.0.1:5002`)."""
    target = address.split("///", 1)[-1]  # dns:///host:port, ipv4:host:port
    target = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    hosts = []
    for one in target.split(","):
        host, _, _ = one.rpartition(":")
        hosts.append(host or one)
    return hosts


def credentials(
    address: str, tls: TlsSettings | None = None, auth: AuthSettings | None = None, client: ClientSettings | None = None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Channel credentials (None: plain text, no token) and channel options for `address`."""
    client = client if client is not None else ClientSettings()
    tls = tls if tls is not None else TlsSettings()
    auth = auth if auth is not None else AuthSettings()
    channel = tls.channel_credentials()
    token = auth.client_token()
    if token is not None:
        if channel is None:
            if not all(is_loopback(h) for h in _hosts(address)):
                raise SecurityError(
                    f"{address}: a token is sent only over TLS (set DISTILLERY_TLS_CA or DISTILLERY_TLS_USE_TLS) "
                    "or to a loopback address"
                )
            channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        channel = grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))
    return channel, [*tls.channel_options(), *client.channel_options()]


def channel(
    address: str,
    options: Options = (),
    *,
    tls: TlsSettings | None = None,
    auth: AuthSettings | None = None,
    client: ClientSettings | None = None,
) -> grpc.Channel:
    """A blocking channel to `address`, secured and balanced as the settings say."""
    creds, extra = credentials(address, tls, auth, client)
    if creds is None:
        return grpc.insecure_channel(address, options=[*options, *extra])
    return grpc.secure_channel(address, creds, options=[*options, *extra])


def aio_channel(
    address: str,
    options: Options = (),
    *,
    tls: TlsSettings | None = None,
    auth: AuthSettings | None = None,
    client: ClientSettings | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `address`, secured and balanced as the settings say."""
    creds, extra = credentials(address, tls, auth, client)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=[*options, *extra])
    return grpc.aio.secure_channel(address, creds, options=[*options, *extra])
