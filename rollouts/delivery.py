"""When to offer an agent its desired configuration, and the offer itself.

The rule is a hash comparison: the agent's last reported remote-config hash against the
desired version's hash. Whatever the agent says about the desired hash (APPLYING,
APPLIED, FAILED) means it has it, so it is never sent again in a loop; a failure stays
visible until the desired version changes (a new version or a rollback).
"""

from __future__ import annotations

from dataclasses import dataclass

from opamp.capabilities import AgentCapabilities, has_capability
from opamp.config_signature import CUSTOM_CAPABILITY, SIGNATURE_FILE_NAME
from opamp.proto import opamp_pb2
from rollouts.desired_state import DesiredConfig


@dataclass(frozen=True)
class OfferContext:
    capabilities: int
    reported_hash: str
    # The hash last offered on this WebSocket connection ("" for HTTP, where each poll is new).
    last_offered_on_connection: str
    persistent_connection: bool
    now_timestamp: float
    reoffer_after_seconds: float


def should_offer(desired: DesiredConfig | None, context: OfferContext) -> bool:
    if desired is None or not has_capability(context.capabilities, AgentCapabilities.ACCEPTS_REMOTE_CONFIG):
        return False
    if context.reported_hash == desired.config_hash:
        return False
    if desired.config_hash == context.last_offered_on_connection:
        return False  # sent on this connection already; the agent has not answered yet
    if context.persistent_connection:
        return True  # a new connection: the previous one may have lost the offer
    # Polling agents: re-offer only when the last offer of this hash is old, so an agent
    # that ignores remote config is not sent the same bytes on every poll.
    recently_offered = (
        desired.offered_hash == desired.config_hash
        and desired.offered_at_timestamp is not None
        and context.now_timestamp - desired.offered_at_timestamp < context.reoffer_after_seconds
    )
    return not recently_offered


def fill_remote_config(reply: opamp_pb2.ServerToAgent, desired: DesiredConfig, *, with_signature: bool) -> None:
    """The operator's files, byte for byte, and the version's config hash.

    Agents that declared the signed-config capability also get the signature as one more
    file; the config hash still covers only the operator's files, which is what the
    signature's envelope names.
    """
    config_map = reply.remote_config.config.config_map
    for name, entry in desired.files.items():
        config_map[name].body = entry["body"].encode("utf-8")
        config_map[name].content_type = entry.get("content_type", "")
    if with_signature and desired.signature:
        config_map[SIGNATURE_FILE_NAME].body = desired.signature.encode("utf-8")
        config_map[SIGNATURE_FILE_NAME].content_type = "application/json"
    reply.remote_config.config_hash = bytes.fromhex(desired.config_hash)


def wants_signature(custom_capabilities: list[str] | None) -> bool:
    return CUSTOM_CAPABILITY in (custom_capabilities or [])
