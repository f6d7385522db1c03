"""A bounded series of each rollout stage's counts, sampled on the rollout ticks.

The rollout page charts the failure rate against the budget over time. Events record the
rate only when something was decided, so each tick of a running rollout records the gate's
counts here as well: only when they changed since the last sample or SAMPLE_EVERY has
passed (a stage that holds for hours writes one row a minute, not one a tick), at most
SAMPLES_PER_STAGE per stage (when over, every other older sample goes, so the series keeps
covering the whole stage at a coarser step), and nothing older than SAMPLE_RETENTION.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.db import transaction

from rollouts.models import Rollout, RolloutSample

if TYPE_CHECKING:
    from rollouts.rollout_services.answers import StageCounts

SAMPLES_PER_STAGE = 240
SAMPLE_EVERY = timedelta(seconds=60)
SAMPLE_RETENTION = timedelta(days=30)


@transaction.atomic
def rollout_sample_record(*, rollout: Rollout, stage: int, counts: StageCounts, now: datetime) -> bool:
    """Record the stage's counts if they are news; True when a sample was written."""
    values = {"answered": counts.reported, "failed": counts.bad, "reachable": counts.reachable}
    series = RolloutSample.objects.filter(rollout=rollout, stage=stage)
    last = series.order_by("-at", "-id").values("at", "answered", "failed", "reachable").first()
    if last is not None:
        unchanged = all(last[key] == value for key, value in values.items())
        if unchanged and now - last["at"] < SAMPLE_EVERY:
            return False
    RolloutSample.objects.create(rollout=rollout, stage=stage, at=now, **values)
    ids = list(series.order_by("at", "id").values_list("id", flat=True))
    if len(ids) > SAMPLES_PER_STAGE:
        # Thin the series by half, keeping its first and latest samples.
        RolloutSample.objects.filter(id__in=ids[1:-1:2]).delete()
    RolloutSample.objects.filter(at__lt=now - SAMPLE_RETENTION).delete()
    return True
