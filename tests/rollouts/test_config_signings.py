"""Signing sequences: every delivery that changes what agents run is signed under a sequence
above every one issued before for the configuration, so agents that refuse replays accept
going back to older content (abort, automatic rollback) and still refuse old envelopes."""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from django.db import connection, connections
from django.db.migrations.loader import MigrationLoader

from fleet import agent_labels
from fleet.models import Agent
from opamp.config_signature import AppliedSigning, SequenceReplayed, SignedConfig, verify_signed_config
from rollouts import services
from rollouts.config_signings import config_version_sign
from rollouts.models import AgentDesiredConfig, ConfigSigning, ConfigVersion, Rollout, RolloutState
from rollouts.rollout_services.creation import StageSpec, rollout_create
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import rollout_abort, rollout_promote, rollout_retry, rollout_start
from signing import selectors
from signing.config_signing import SigningKeyPair, generate_signing_key
from signing.file_cache import reset_file_cache
from tests.rollouts.rollout_helpers import CANDIDATE, STABLE, answer_all, make_fleet

pytestmark = pytest.mark.django_db

V2 = {"c.yaml": {"body": "v: two\n", "content_type": "text/yaml"}}
NEXT = {"c.yaml": {"body": "v: next\n", "content_type": "text/yaml"}}


@pytest.fixture
def signing_key(settings, tmp_path) -> SigningKeyPair:
    path = tmp_path / "signing.key"
    pair = generate_signing_key(path)
    settings.OPAMP_SIGNING_KEY_FILE = str(path)
    reset_file_cache()
    return pair


@dataclass
class VerifyingFleet:
    """Agents that check every delivery as `agent_client --trusted-key` does, and apply it."""

    running: dict[int, AppliedSigning] = field(default_factory=dict)
    history: dict[int, list[int]] = field(default_factory=dict)

    def deliver(self) -> int:
        """Every agent whose desired content differs from what it runs gets its delivery;
        a refusal fails the test. The number of agents that applied something."""
        trusted = selectors.trusted_public_keys()
        applied = 0
        rows = AgentDesiredConfig.objects.values_list("agent_id", "version__config_hash", "version__signature")
        for agent_id, config_hash, document in rows:
            current = self.running.get(agent_id)
            if current is not None and current.config_hash == config_hash:
                continue  # the server offers by hash: nothing is sent
            envelope = verify_signed_config(
                SignedConfig.from_json_bytes(document),
                trusted_keys=trusted,
                config_hash_hex=config_hash,
                running=current,
            )
            self.running[agent_id] = AppliedSigning.of(envelope)
            self.history.setdefault(agent_id, []).append(envelope.sequence)
            applied += 1
        return applied


def tick(rollout: Rollout) -> str:
    result = rollout_tick(rollout_id=rollout.pk)
    rollout.refresh_from_db()
    return result


def three_stages(configuration, candidate) -> Rollout:
    stages = [StageSpec(percent=20), StageSpec(percent=50), StageSpec(percent=100)]
    return rollout_create(configuration=configuration, candidate=candidate, stages=stages, actor=None, salt="s")


def top_sequence() -> int:
    return max(ConfigSigning.objects.values_list("sequence", flat=True))


def test_every_kind_of_transition_delivers_a_fresh_sequence_to_the_agents_it_moves(signing_key):
    make_fleet(200)
    fleet = VerifyingFleet()
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)

    # publish
    services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    assert fleet.deliver() == 200
    services.configuration_publish(configuration=configuration, files=V2, author=None)
    assert fleet.deliver() == 200
    # rollback to older content (a new version of it)
    services.configuration_rollback(configuration=configuration, to_number=1, author=None)
    assert fleet.deliver() == 200
    configuration.refresh_from_db()
    stable = configuration.current_version
    assert stable is not None

    # rollout start, step, abort (back to the stable content, signed anew)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    rollout = three_stages(configuration, candidate)
    assert rollout_start(rollout=rollout, actor=None)
    first_stage = fleet.deliver()
    assert 0 < first_stage < 200
    answer_all()
    assert tick(rollout) == "stage 1 started"
    assert fleet.deliver() > 0
    assert rollout_abort(rollout=rollout, actor=None)
    assert fleet.deliver() > first_stage
    stable_signing = ConfigSigning.objects.filter(version=stable).order_by("-sequence").first()
    assert stable_signing is not None and stable_signing.sequence == top_sequence()
    answer_all()
    assert tick(rollout) == "rolled back"

    # retry, promote, succeed
    assert rollout_retry(rollout=rollout, actor=None)
    assert fleet.deliver() > 0
    assert rollout_promote(rollout=rollout, actor=None)
    assert fleet.deliver() > 0
    answer_all()
    assert tick(rollout) == "succeeded"
    assert fleet.deliver() == 0  # everyone already runs the candidate

    # automatic rollback to stable (the candidate just promoted) when the budget is exceeded
    configuration.refresh_from_db()
    failing_candidate, _ = services.configuration_publish(
        configuration=configuration, files=NEXT, author=None, activate=False
    )
    stages = [StageSpec(percent=100)]
    second = rollout_create(
        configuration=configuration, candidate=failing_candidate, stages=stages, actor=None, salt="t"
    )
    assert rollout_start(rollout=second, actor=None)
    assert fleet.deliver() == 200
    answer_all(failing=set(AgentDesiredConfig.objects.values_list("agent_id", flat=True)[:50]))
    assert tick(second) == "rolling back"
    assert fleet.deliver() == 200

    # Each agent saw strictly increasing sequences, whatever content they carried.
    for sequences in fleet.history.values():
        assert sequences == sorted(set(sequences))
    assert list(ConfigSigning.objects.order_by("pk").values_list("sequence", flat=True)) == list(
        range(1, top_sequence() + 1)
    )


def test_a_replay_of_the_candidates_envelope_after_an_abort_is_refused(signing_key):
    make_fleet(20)
    fleet = VerifyingFleet()
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    stable, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    fleet.deliver()
    rollout = rollout_create(
        configuration=configuration, candidate=candidate, stages=[StageSpec(percent=100)], actor=None, salt="s"
    )
    rollout_start(rollout=rollout, actor=None)
    fleet.deliver()
    candidate.refresh_from_db()
    candidate_envelope = candidate.signature
    rollout_abort(rollout=rollout, actor=None)
    fleet.deliver()

    some_agent = next(iter(fleet.running))
    assert fleet.running[some_agent].config_hash == stable.config_hash
    with pytest.raises(SequenceReplayed):
        verify_signed_config(
            candidate_envelope.encode(),
            trusted_keys=selectors.trusted_public_keys(),
            config_hash_hex=candidate.config_hash,
            running=fleet.running[some_agent],
        )


def test_the_stable_version_keeps_its_older_signings_for_the_agents_that_run_them(signing_key):
    make_fleet(20)
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    stable, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    stable.refresh_from_db()
    first = stable.signature
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    rollout = rollout_create(
        configuration=configuration, candidate=candidate, stages=[StageSpec(percent=10)], actor=None, salt="s"
    )
    rollout_start(rollout=rollout, actor=None)
    rollout_abort(rollout=rollout, actor=None)
    stable.refresh_from_db()
    assert stable.signature != first
    # Same content, same hash: agents still on stable are not offered anything again, and
    # the envelope they run still verifies for them.
    signings = list(ConfigSigning.objects.filter(version=stable).order_by("sequence"))
    assert [s.document for s in signings] == [first, stable.signature]
    assert [s.sequence for s in signings] == [1, 3]
    verify_signed_config(
        first.encode(),
        trusted_keys=selectors.trusted_public_keys(),
        config_hash_hex=stable.config_hash,
        running=AppliedSigning(1, stable.config_hash),
    )


def test_a_transition_to_the_newest_signed_version_signs_nothing_new(signing_key):
    make_fleet(20)
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    rollout = three_stages(configuration, candidate)
    rollout_start(rollout=rollout, actor=None)
    # The candidate's signing from its publication is the newest: nothing to re-sign.
    assert ConfigSigning.objects.count() == 2


def test_keys_rotate_without_breaking_the_sequence(signing_key, settings, tmp_path):
    make_fleet(20)
    fleet = VerifyingFleet()
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    fleet.deliver()
    rollout = rollout_create(
        configuration=configuration, candidate=candidate, stages=[StageSpec(percent=100)], actor=None, salt="s"
    )
    rollout_start(rollout=rollout, actor=None)
    fleet.deliver()

    # A new key signs from now on; the old one stays accepted (two trusted key ids).
    next_key = generate_signing_key(tmp_path / "next.key")
    settings.OPAMP_SIGNING_KEY_FILE = str(tmp_path / "next.key")
    reset_file_cache()
    rollout_abort(rollout=rollout, actor=None)
    assert set(selectors.trusted_public_keys()) == {signing_key.key_id, next_key.key_id}
    assert fleet.deliver() == 20
    newest = ConfigSigning.objects.order_by("-sequence").first()
    assert newest is not None and (newest.key_id, newest.sequence) == (next_key.key_id, 3)
    assert {signing.sequence for signing in fleet.running.values()} == {3}


def test_without_a_signing_key_nothing_is_signed_on_transitions(settings):
    settings.OPAMP_SIGNING_KEY_FILE = ""
    make_fleet(20)
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    rollout = rollout_create(
        configuration=configuration, candidate=candidate, stages=[StageSpec(percent=100)], actor=None, salt="s"
    )
    rollout_start(rollout=rollout, actor=None)
    rollout_abort(rollout=rollout, actor=None)
    assert not ConfigSigning.objects.exists()
    assert set(ConfigVersion.objects.values_list("signature", flat=True)) == {""}


@pytest.mark.django_db(transaction=True)
def test_concurrent_signings_of_one_configuration_never_reuse_a_sequence(signing_key):
    if connection.vendor != "postgresql":
        pytest.skip("needs real row locks: PostgreSQL")
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    stable, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def sign(version: ConfigVersion) -> None:
        try:
            barrier.wait()
            config_version_sign(version=version, reason=ConfigSigning.Reason.ROLLOUT)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=sign, args=(stable if i % 2 else candidate,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    sequences = sorted(ConfigSigning.objects.values_list("sequence", flat=True))
    assert sequences == list(range(1, threads_count + 3))


@pytest.mark.django_db(transaction=True)
def test_concurrent_abort_and_publish_of_another_candidate_issue_distinct_sequences(signing_key):
    if connection.vendor != "postgresql":
        pytest.skip("needs real row locks: PostgreSQL")
    make_fleet(200)
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    rollout = rollout_create(
        configuration=configuration, candidate=candidate, stages=[StageSpec(percent=100)], actor=None, salt="s"
    )
    rollout_start(rollout=rollout, actor=None)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(work) -> None:
        try:
            barrier.wait()
            work()
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=run, args=(lambda: rollout_abort(rollout=rollout, actor=None),)),
        threading.Thread(
            target=run,
            args=(
                lambda: services.configuration_publish(
                    configuration=configuration, files=NEXT, author=None, activate=False
                ),
            ),
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(ConfigSigning.objects.values_list("sequence", flat=True)) == [1, 2, 3, 4]
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.ROLLING_BACK


def test_signatures_made_before_sequences_are_recorded_as_signings_by_the_data_migration(signing_key):
    """The migration keeps each v1 envelope's version as its sequence, so new sequences
    continue above what agents remember."""
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    version, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    legacy = {
        "envelope": {
            "config_hash": version.config_hash,
            "configuration": "fleet",
            "version": 7,
            "issued_at": "2025-01-31T12:00:00Z",
            "key_id": signing_key.key_id,
        },
        "signature": "AA==",
    }
    ConfigSigning.objects.all().delete()
    ConfigVersion.objects.filter(pk=version.pk).update(signature=json.dumps(legacy))
    migration = importlib.import_module("signing.migrations.0003_config_signings_from_versions")
    # The models as the migration knows them (ConfigSigning belonged to the signing app then).
    historical = MigrationLoader(connection).project_state(("signing", "0003_config_signings_from_versions")).apps
    migration.record_existing_signatures(historical, None)

    signing = ConfigSigning.objects.get()
    assert (signing.version_id, signing.sequence, signing.key_id, signing.reason) == (
        version.pk,
        7,
        signing_key.key_id,
        "migrated",
    )
    assert signing.issued_at == datetime(2025, 1, 31, 12, tzinfo=UTC)
    version.refresh_from_db()
    next_signing = config_version_sign(version=version, reason=ConfigSigning.Reason.ROLLOUT)
    assert next_signing is not None and next_signing.sequence == 8


def test_an_agent_moved_back_to_stable_by_a_label_change_gets_a_fresh_sequence(signing_key):
    """Removing `deployment.canary` mid-rollout takes an agent out of the first stage."""
    agents = make_fleet(20)
    canary = agents[0]
    Agent.objects.filter(pk__in=[a.pk for a in agents]).update(identifying_attributes={"env": "prod"})
    agent_labels.agent_labels_set(instance_uid=canary.instance_uid, labels={"deployment.canary": "true"}, actor=None)
    fleet = VerifyingFleet()
    configuration = services.configuration_create(name="fleet", selector="env=prod", actor=None)
    stable, _ = services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    fleet.deliver()
    rollout = rollout_create(
        configuration=configuration,
        candidate=candidate,
        stages=[StageSpec(percent=0.01), StageSpec(percent=100)],
        actor=None,
        salt="s",
    )
    rollout_start(rollout=rollout, actor=None)
    fleet.deliver()
    assert fleet.running[canary.pk].config_hash == candidate.config_hash

    agent_labels.agent_labels_set(instance_uid=canary.instance_uid, labels={"deployment.canary": "false"}, actor=None)
    assert AgentDesiredConfig.objects.get(agent=canary).version_id == stable.pk
    assert fleet.deliver() == 1
    assert fleet.running[canary.pk].config_hash == stable.config_hash

    # A label change that moves nobody signs nothing.
    signings = ConfigSigning.objects.count()
    agent_labels.agent_labels_set(instance_uid=agents[1].instance_uid, labels={"team": "a"}, actor=None, replace=False)
    assert ConfigSigning.objects.count() == signings
