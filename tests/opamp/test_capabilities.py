from __future__ import annotations

from opamp.capabilities import (
    ALL_AGENT_CAPABILITIES,
    ALL_SERVER_CAPABILITIES,
    AgentCapabilities,
    agent_capability_names,
    has_capability,
    known_agent_capabilities,
)
from opamp.proto import opamp_pb2


def test_every_agent_capability_of_the_proto_has_a_flag():
    defined = {v.number for v in opamp_pb2.AgentCapabilities.DESCRIPTOR.values if v.number}
    assert {int(member) for member in AgentCapabilities} == defined
    assert ALL_AGENT_CAPABILITIES == 0xFFFF


def test_all_server_capabilities_cover_the_seven_defined_bits():
    assert ALL_SERVER_CAPABILITIES == 0x7F


def test_undefined_capability_bits_are_dropped():
    assert known_agent_capabilities(0xFFFF_FFFF_FFFF_FFFF) == 0xFFFF
    assert known_agent_capabilities(1 << 40 | 0x2) == 0x2


def test_has_capability_checks_the_bit():
    assert has_capability(0x3, AgentCapabilities.ACCEPTS_REMOTE_CONFIG)
    assert not has_capability(0x1, AgentCapabilities.ACCEPTS_REMOTE_CONFIG)


def test_capability_names_are_listed_in_bit_order():
    assert agent_capability_names(0x2003) == ["reports_status", "accepts_remote_config", "reports_heartbeat"]
