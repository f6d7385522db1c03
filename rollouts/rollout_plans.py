"""Active rollouts as the resolver needs them: which version each agent of a configuration runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleet.label_selectors.parsing import parse_selector
from rollouts.cohorts import StagePlan, bucket_of, cohort_of
from rollouts.models import ACTIVE_ROLLOUT_STATES, Rollout, RolloutState


@dataclass(frozen=True)
class RolloutPlan:
    rollout_id: int
    state: str
    stage_index: int
    salt: str
    stages: tuple[StagePlan, ...]
    stable_version_id: int
    candidate_version_id: int
    candidate_hash: str

    def cohort(self, instance_uid: bytes, labels: Mapping[str, str]) -> tuple[int, int]:
        """(stage index, bucket) of an agent."""
        bucket = bucket_of(self.salt, instance_uid)
        return cohort_of(bucket=bucket, labels=labels, stages=self.stages), bucket

    def version_for(self, instance_uid: bytes, labels: Mapping[str, str]) -> tuple[int, int | None, int]:
        """(version id, cohort or None when the agent stays on stable, bucket)."""
        stage, bucket = self.cohort(instance_uid, labels)
        if self.state == RolloutState.ROLLING_BACK or stage > self.stage_index:
            return self.stable_version_id, None, bucket
        return self.candidate_version_id, stage, bucket


def plan_of(rollout: Rollout) -> RolloutPlan:
    """The plan of a configuration's or a package's rollout (the versions are the subject's)."""
    stages = tuple(
        StagePlan(threshold=stage.bucket_threshold, selector=parse_selector(stage.selector) if stage.selector else None)
        for stage in rollout.stages.all()
    )
    return RolloutPlan(
        rollout_id=rollout.pk,
        state=rollout.state,
        stage_index=rollout.stage_index,
        salt=rollout.salt,
        stages=stages,
        stable_version_id=int(rollout.stable_package_version_id or rollout.stable_version_id or 0),
        candidate_version_id=int(rollout.candidate_package_version_id or rollout.candidate_version_id or 0),
        candidate_hash=rollout.candidate_version.config_hash if rollout.candidate_version is not None else "",
    )


def active_rollout_plans() -> dict[int, RolloutPlan]:
    """configuration id -> plan of its active rollout (at most one, by constraint)."""
    rollouts = (
        Rollout.objects.filter(state__in=ACTIVE_ROLLOUT_STATES, configuration__isnull=False)
        .select_related("candidate_version")
        .prefetch_related("stages")
    )
    return {int(rollout.configuration_id or 0): plan_of(rollout) for rollout in rollouts}
