"""Deterministic, nested rollout cohorts. Pure Python.

bucket = SHA-256(salt + instance_uid) mod 10,000: stable across processes and restarts
(never Python's randomised hash()). A stage holds the agents whose bucket is below its
threshold; thresholds only grow, so every stage contains the previous ones. Agents
labelled deployment.canary=true are always in the first stage; the last stage catches
everyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.label_selectors.selector import LabelSelector

BUCKETS = 10_000
CANARY_LABEL = "deployment.canary"


def bucket_of(salt: str, instance_uid: bytes) -> int:
    digest = hashlib.sha256(salt.encode("utf-8") + instance_uid).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def percent_threshold(percent: float) -> int:
    """Buckets below the result make up `percent` of the fleet."""
    return max(0, min(BUCKETS, round(percent * BUCKETS / 100)))


def count_threshold(sorted_buckets: Sequence[int], count: int) -> int:
    """The smallest threshold that takes the first `count` agents of a population."""
    if count <= 0 or not sorted_buckets:
        return 0
    if count >= len(sorted_buckets):
        return BUCKETS
    return sorted_buckets[count - 1] + 1


@dataclass(frozen=True)
class StagePlan:
    threshold: int
    selector: LabelSelector | None = None


def cohort_of(*, bucket: int, labels: Mapping[str, str], stages: Sequence[StagePlan]) -> int:
    """The index of the first stage an agent belongs to."""
    if labels.get(CANARY_LABEL) == "true":
        return 0
    for index, stage in enumerate(stages[:-1]):
        if stage.selector is not None and not stage.selector.matches(labels):
            continue
        if bucket < stage.threshold:
            return index
    return len(stages) - 1
