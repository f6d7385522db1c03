"""Agents that answer like real ones, by writing what their reports would write."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from fleet.models import Agent, RemoteConfigState
from opamp.identifiers import uuid7
from rollouts import services
from rollouts.models import AgentDesiredConfig, Configuration, ConfigVersion, Rollout
from rollouts.rollout_services.answers import record_answer
from rollouts.rollout_services.creation import StageSpec, rollout_create

STABLE = {"c.yaml": {"body": "v: stable\n", "content_type": "text/yaml"}}
CANDIDATE = {"c.yaml": {"body": "v: candidate\n", "content_type": "text/yaml"}}


def make_fleet(count: int, **labels: str) -> list[Agent]:
    now = timezone.now()
    agents = Agent.objects.bulk_create(
        [
            Agent(instance_uid=uuid7(), labels={"env": "prod", **labels}, last_seen=now, connected=True)
            for _ in range(count)
        ]
    )
    return agents


def configuration_with_candidate() -> tuple[Configuration, ConfigVersion, ConfigVersion]:
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    stable, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    return configuration, stable, candidate


def standard_rollout(
    configuration: Configuration, candidate: ConfigVersion, *, hold: float = 0.0, **options: object
) -> Rollout:
    stages = [StageSpec(percent=1, hold_seconds=hold), StageSpec(percent=10, hold_seconds=hold), StageSpec(percent=100)]
    return rollout_create(
        configuration=configuration, candidate=candidate, stages=stages, actor=None, salt="s", **options
    )


def answer_all(
    *, failing: set[int] = frozenset(), unhealthy: set[int] = frozenset(), skip: set[int] = frozenset()
) -> int:
    """Every agent applies what it is assigned (or fails, for ids in `failing`); ids in
    `skip` stay silent."""
    answered = 0
    for desired in AgentDesiredConfig.objects.select_related("version", "agent"):
        agent = desired.agent
        if agent.remote_config_hash == desired.version.config_hash or agent.pk in skip:
            continue
        fails = agent.pk in failing
        agent.remote_config_hash = desired.version.config_hash
        agent.remote_config_state = RemoteConfigState.FAILED if fails else RemoteConfigState.APPLIED
        agent.remote_config_error = "rejected" if fails else ""
        agent.healthy = agent.pk not in unhealthy
        agent.save(update_fields=["remote_config_hash", "remote_config_state", "remote_config_error", "healthy"])
        record_answer(
            agent_id=agent.pk,
            config_hash=agent.remote_config_hash,
            state=agent.remote_config_state,
            error=agent.remote_config_error,
        )
        answered += 1
    return answered


def go_offline(agents: list[Agent]) -> None:
    Agent.objects.filter(pk__in=[a.pk for a in agents]).update(last_seen=timezone.now() - timedelta(hours=1))


def hashes_by_agent() -> dict[int, str]:
    return dict(AgentDesiredConfig.objects.values_list("agent_id", "version__config_hash"))
