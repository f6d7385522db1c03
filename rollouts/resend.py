"""Re-send an agent its desired configuration (an operator's action on the agent page).

The server offers a configuration once per connection, and to a polling agent again only
after OPAMP_REMOTE_CONFIG_REOFFER_SECONDS, remembering each offer in the agent's
AgentDesiredConfig row (offered_hash, offered_at) and, per WebSocket connection, in the
session. Re-sending forgets both: the row's offer record is cleared and the agent's desired
state is logged as changed, so every server process drops its cached copy and reads the
cleared record; a session that finds its connection's offer no longer on record offers
again (fleet.session). The hint then pushes the offer on a live WebSocket; a polling agent
gets it on its next poll. An agent that already reports the desired hash (applied or
failed) is still not offered it: delivery never re-sends what the agent says it has.
"""

from __future__ import annotations

from django.db import transaction

from fleet.audit import Actor, audit_record
from fleet.errors import DomainError
from fleet.models import Agent
from rollouts import desired_state
from rollouts.models import AgentDesiredConfig

NOTHING_TO_RESEND = "this agent has no desired configuration to re-send"


@transaction.atomic
def agent_config_resend(*, agent: Agent, actor: Actor) -> int:
    """Forget what was offered to `agent` and hint it; the generation the change was logged under."""
    desired = AgentDesiredConfig.objects.select_for_update().filter(agent=agent).select_related("version").first()
    if desired is None:
        raise DomainError(NOTHING_TO_RESEND)
    before = {"offered_hash": desired.offered_hash, "offered_at": desired.offered_at}
    AgentDesiredConfig.objects.filter(agent=agent).update(offered_hash="", offered_at=None)
    generation = desired_state.log_changes([agent.pk])
    audit_record(
        actor=actor,
        action="agent.config.resend",
        target=agent,
        details={
            "instance_uid": str(agent.instance_uid),
            "config_hash": desired.version.config_hash,
            "offered_hash": before["offered_hash"],
            "offered_at": before["offered_at"].isoformat() if before["offered_at"] else None,
        },
    )
    transaction.on_commit(lambda: desired_state.notify_agents([agent.pk], generation=generation))
    return generation
