"""Client-side load balancing of the project's channels: two real gRPC servers behind one multi-address target."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grpc
import pytest

from services.common import channels


def _server(name: bytes) -> tuple[grpc.Server, int]:
    """A server whose one method answers its own name (raw bytes, no proto needed)."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Who", {"Am": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def two_replicas() -> Iterator[str]:
    """A target that resolves to two servers, like `dns:///serving-headless:50053` to two pods."""
    a, port_a = _server(b"a")
    b, port_b = _server(b"b")
    try:
        yield f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
    finally:
        a.stop(0)
        b.stop(0)


def _answers(target: str, client: channels.ClientSettings, calls: int = 20) -> collections.Counter[bytes]:
    """Who answered `calls` calls, counted once the channel has connected to every address it will use (a policy
    only picks among connected addresses, and the second may connect a moment after the first)."""
    with channels.channel(target, client=client) as channel:
        who = channel.unary_unary("/test.Who/Am")
        seen = {who(b"", timeout=10, wait_for_ready=True) for _ in range(10)}
        if client.lb_policy == "round_robin":
            for _ in range(200):
                if len(seen) == 2:
                    break
                seen.add(who(b"", timeout=10, wait_for_ready=True))
        return collections.Counter(who(b"", timeout=10, wait_for_ready=True) for _ in range(calls))


def test_round_robin_spreads_calls_over_every_address(two_replicas: str) -> None:
    answers = _answers(two_replicas, channels.ClientSettings(lb_policy="round_robin"))
    assert answers == {b"a": 10, b"b": 10}


def test_pick_first_sends_every_call_to_one_address(two_replicas: str) -> None:
    answers = _answers(two_replicas, channels.ClientSettings())
    assert len(answers) == 1 and sum(answers.values()) == 20


def test_the_policy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_GRPC_LB_POLICY", "round_robin")
    assert ("grpc.lb_policy_name", "round_robin") in channels.credentials("dns:///serving-headless:50053")[1]
    monkeypatch.setenv("DISTILLERY_GRPC_LB_POLICY", "random")
    with pytest.raises(ValueError, match="lb_policy"):
        channels.ClientSettings()


def test_a_token_goes_in_plain_text_only_to_loopback_replicas() -> None:
    from services.common.security import AuthSettings, SecurityError, TlsSettings

    token = AuthSettings(token="t" * 32)
    channels.credentials("ipv4:127.0.0.1:5001,127.0.0.1:5002", TlsSettings(), token)
    with pytest.raises(SecurityError):
        channels.credentials("ipv4:127.0.0.1:5001,10.0.0.7:5002", TlsSettings(), token)
