"""Convergence under concurrency, on PostgreSQL: new agents' first reports, publishes,
rollbacks and rollout steps interleaved at random from several threads. Afterwards every
agent's stored assignment must be the resolver's answer, without the reconciler's help.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from django.db import DatabaseError, connection, connections
from django.utils import timezone

from fleet import services as fleet_services
from fleet.errors import DomainError
from fleet.models import Agent
from fleet.reports import ReportLimits, report_from_message
from opamp.identifiers import uuid7
from rollouts import resolver_cache, services
from rollouts.desired_state import computed_assignments, stored_assignments
from rollouts.models import ACTIVE_ROLLOUT_STATES, Configuration, Rollout
from rollouts.rollout_services.creation import StageSpec, rollout_create
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import rollout_abort, rollout_promote, rollout_start
from tests.fleet.messages import BASE_CAPABILITIES, full_report
from tests.rollouts.rollout_helpers import answer_all, make_fleet

pytestmark = pytest.mark.django_db(transaction=True)

AGENT_THREADS = 3
AGENTS_PER_THREAD = 80
OPERATOR_THREADS = 2


@pytest.fixture(autouse=True)
def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs concurrent transactions: PostgreSQL (SQLite serialises every writer)")
    resolver_cache.clear()


def files(body: str) -> dict[str, dict[str, str]]:
    return {"c.yaml": {"body": body, "content_type": "text/yaml"}}


def first_report(uid: uuid.UUID, labels: dict[str, str]) -> None:
    message = full_report(uid.bytes, 0, service="checkout", extra_identifying=labels)
    fleet_services.agent_record_report(
        instance_uid=uid,
        report=report_from_message(message, ReportLimits(), BASE_CAPABILITIES),
        sequence_num=0,
        transport="websocket",
        remote_address="127.0.0.1",
        seen_at=timezone.now(),
    )


def random_labels(rng: random.Random) -> dict[str, str]:
    return {"env": rng.choice(["prod", "prod", "dev"]), "team": rng.choice(["web", "db", "db"])}


class Operator:
    """One operator's random walk over publishes, rollbacks and rollout steps."""

    def __init__(self, seed: int, outcomes: Counter[str]) -> None:
        self.rng = random.Random(seed)
        self.outcomes = outcomes
        self.serial = 0

    def step(self) -> None:
        configuration = Configuration.objects.get(name=self.rng.choice(["base", "web"]))
        action: Callable[[Configuration], str] = self.rng.choice(
            [self.publish, self.publish, self.rollback, self.rollout_step, self.rollout_step, self.rollout_step]
        )
        try:
            self.outcomes[action(configuration)] += 1
        except DomainError:
            self.outcomes["refused"] += 1

    def body(self) -> dict[str, dict[str, str]]:
        self.serial += 1
        return files(f"v: {self.rng.random()} {self.serial}\n")

    def publish(self, configuration: Configuration) -> str:
        services.configuration_publish(configuration=configuration, files=self.body(), author=None)
        return "publish"

    def rollback(self, configuration: Configuration) -> str:
        top = configuration.versions.count()
        if top < 2:
            return "nothing to roll back"
        services.configuration_rollback(configuration=configuration, to_number=self.rng.randint(1, top), author=None)
        return "rollback"

    def rollout_step(self, configuration: Configuration) -> str:
        rollout = configuration.rollouts.filter(state__in=ACTIVE_ROLLOUT_STATES).first()
        if rollout is None:
            candidate, _ = services.configuration_publish(
                configuration=configuration, files=self.body(), author=None, activate=False
            )
            rollout = rollout_create(
                configuration=configuration,
                candidate=candidate,
                stages=[StageSpec(count=3), StageSpec(percent=40), StageSpec(percent=100)],
                actor=None,
                apply_timeout_seconds=3600,
            )
            rollout_start(rollout=rollout, actor=None)
            return "rollout started"
        verb = self.rng.choice(["tick", "tick", "answer", "answer", "abort", "promote"])
        if verb == "tick":
            rollout_tick(rollout_id=rollout.pk)
        elif verb == "answer":
            answer_all()
        elif verb == "abort":
            rollout_abort(rollout=rollout, actor=None)
        else:
            rollout_promote(rollout=rollout, actor=None)
        return f"rollout {verb}"


def test_agents_publishes_rollbacks_and_rollout_steps_interleaved_leave_every_agent_converged():
    base = services.configuration_create(name="base", selector="env=prod", actor=None)
    services.configuration_publish(configuration=base, files=files("v: base\n"), author=None)
    services.configuration_create(name="web", selector="team=web", priority=5, actor=None)
    make_fleet(60)
    make_fleet(30, env="dev", team="web")

    agents_done = threading.Event()
    errors: list[tuple[str, BaseException]] = []
    outcomes: Counter[str] = Counter()
    created: list[uuid.UUID] = []

    def agents(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(AGENTS_PER_THREAD):
            uid = uuid7()
            first_report(uid, random_labels(rng))
            created.append(uid)

    def operate(seed: int) -> None:
        operator = Operator(seed, outcomes)
        while not agents_done.is_set():
            try:
                operator.step()
            except DatabaseError as error:
                # Two operators' writes can deadlock with each other; PostgreSQL ends one
                # transaction and nothing of it stays. Count it and go on.
                if "deadlock detected" not in str(error):
                    raise
                outcomes["deadlock between operators"] += 1

    def run(name: str, target: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as error:
                errors.append((name, error))
            finally:
                connections.close_all()

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    operators = [run(f"operator-{i}", lambda i=i: operate(100 + i)) for i in range(OPERATOR_THREADS)]
    reporters = [run(f"agents-{i}", lambda i=i: agents(i)) for i in range(AGENT_THREADS)]
    for thread in reporters:
        thread.join(120)
    agents_done.set()
    for thread in operators:
        thread.join(120)
    assert not any(t.is_alive() for t in reporters + operators)
    assert errors == [], [str(e) for _, e in errors]
    assert len(created) == AGENT_THREADS * AGENTS_PER_THREAD
    # The walk did what it is here for (a publish and a rollout step at least).
    assert outcomes["publish"] and sum(n for k, n in outcomes.items() if k.startswith("rollout")), outcomes

    rows = list(Agent.objects.values_list("pk", "instance_uid", "labels"))
    assert len(rows) == 90 + len(created)
    computed = {agent_id: value for agent_id, value in computed_assignments(rows).items() if value is not None}
    stored = stored_assignments([row[0] for row in rows])
    wrong = {agent_id: (stored.get(agent_id), computed.get(agent_id)) for agent_id in set(stored) | set(computed)}
    wrong = {agent_id: pair for agent_id, pair in wrong.items() if pair[0] != pair[1]}
    assert wrong == {}, (len(wrong), outcomes, Rollout.objects.values_list("state", flat=True))
