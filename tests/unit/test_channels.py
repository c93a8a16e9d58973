"""client/channels.py: targets and the service config that make gRPC balance replicas."""

from __future__ import annotations

import json

import pytest
from bertstream.client.channels import SERVICE_CONFIG, channel_options, channel_target


@pytest.mark.parametrize(("servers", "target"), [
    ("localhost:8001", "dns:///localhost:8001"),
    ("bertstream.ns.svc.cluster.local:8001", "dns:///bertstream.ns.svc.cluster.local:8001"),
    ("dns:///x:1", "dns:///x:1"),
    ("ipv4:127.0.0.1:1", "ipv4:127.0.0.1:1"),
    ("127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    (["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:1"], "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ("[::1]:1,127.0.0.1:2", "ipv6:[::1]:1,[::ffff:127.0.0.1]:2"),
    ("localhost:5, 127.0.0.1:6", None),  # resolved: one entry per address localhost has
])
def test_channel_target(servers: str | list[str], target: str | None) -> None:
    got = channel_target(servers)
    if target is not None:
        assert got == target
    else:
        assert got.startswith(("ipv4:", "ipv6:")) and got.endswith(":6")


@pytest.mark.parametrize(
    "servers", ["", " , ", "nohost", "a:b,c:1", "127.0.0.1:1,nohost"])
def test_bad_server_lists_are_refused(servers: str) -> None:
    with pytest.raises(ValueError):
        channel_target(servers)


def test_service_config_asks_for_round_robin_with_health_checks() -> None:
    options = dict(channel_options())
    config = json.loads(options["grpc.service_config"])
    assert config == SERVICE_CONFIG
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert options["grpc.max_reconnect_backoff_ms"] <= 5000
