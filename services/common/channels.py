"""The one place gRPC client channels are made: TLS, mTLS and the bearer token from `DISTILLERY_TLS_*` /
`DISTILLERY_AUTH_*`, plain text by default.

Every client in the project (CLI, demo, load generator, benches, readiness checks) opens its channels here, so one
set of variables secures all of them. A token travels only over TLS or to a loopback address: gRPC's call
credentials need a secure channel, and local credentials are how a plain-text loopback connection counts as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common.security import AuthSettings, SecurityError, TlsSettings, is_loopback

Options = Sequence[tuple[str, Any]]


def _host(address: str) -> str:
    target = address.split("///", 1)[-1]  # dns:///host:port, ipv4:host:port
    target = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    host, _, _ = target.rpartition(":")
    return host or target


def credentials(
    address: str, tls: TlsSettings | None = None, auth: AuthSettings | None = None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Channel credentials (None: plain text, no token) and channel options for `address`."""
    tls = tls if tls is not None else TlsSettings()
    auth = auth if auth is not None else AuthSettings()
    channel = tls.channel_credentials()
    token = auth.client_token()
    if token is not None:
        if channel is None:
            if not is_loopback(_host(address)):
                raise SecurityError(
                    f"{address}: a token is sent only over TLS (set DISTILLERY_TLS_CA or DISTILLERY_TLS_USE_TLS) "
                    "or to a loopback address"
                )
            channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        channel = grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))
    return channel, tls.channel_options()


def channel(
    address: str, options: Options = (), *, tls: TlsSettings | None = None, auth: AuthSettings | None = None
) -> grpc.Channel:
    """A blocking channel to `address`, secured as the settings say."""
    creds, extra = credentials(address, tls, auth)
    if creds is None:
        return grpc.insecure_channel(address, options=[*options, *extra])
    return grpc.secure_channel(address, creds, options=[*options, *extra])


def aio_channel(
    address: str, options: Options = (), *, tls: TlsSettings | None = None, auth: AuthSettings | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to `address`, secured as the settings say."""
    creds, extra = credentials(address, tls, auth)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=[*options, *extra])
    return grpc.aio.secure_channel(address, creds, options=[*options, *extra])
