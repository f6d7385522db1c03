"""Per-process caches for desired-state resolution and delivery.

A new agent's first report resolves its desired state. Re-reading every configuration
and every active rollout (with its stages and candidate) from the database for each new
agent was about 6 of the ~10 ms of server CPU a first report cost, which capped a single
server process at ~60 connecting agents per second. These rarely change, so each process
keeps them:

- `resolver_definitions()`: the active configurations (selector, precedence, current
  version) and the active rollout plans, keyed by `DesiredStateGeneration.definitions`.
  Every write of a configuration, a current version, a rollout or its stages calls
  `bump_definitions()` in its own transaction, right after the write, which replaces the
  token. A lookup reads the token first (one primary-key SELECT) and the data after it, so
  the data is never older than the token it is stored under; a writer's own later resolves
  in the same transaction see its new token and re-read; other transactions see the new
  token at the commit that makes the writes visible.
- `config_files()`: the files of a version by its config hash. The hash is the SHA-256 of
  the files' canonical encoding (names, bodies, content types), so a hash names one content
  for good: the entry can never be stale, whatever happens to the rows. Delivery then reads
  per agent only the small columns (hash, number, signature), not the files.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import LabelSelector
from rollouts.models import Configuration, ConfigVersion, DesiredStateGeneration
from rollouts.rollout_plans import RolloutPlan, active_rollout_plans

# Bounds memory if versions pile up; far above what one fleet has in flight.
MAX_CACHED_FILES = 256


@dataclass(frozen=True)
class CandidateConfiguration:
    """A configuration with a current version, as the resolver needs it."""

    configuration_id: int
    current_version_id: int
    selector: LabelSelector


@dataclass(frozen=True)
class ResolverDefinitions:
    token: str
    candidates: tuple[CandidateConfiguration, ...]  # precedence order: priority, then name
    plans: dict[int, RolloutPlan]  # configuration id -> plan of its active rollout


_definitions: ResolverDefinitions | None = None
_files: dict[str, dict[str, dict[str, str]]] = {}
_files_lock = threading.Lock()


def bump_definitions() -> None:
    """Call in the transaction of any write the resolver reads (see the module doc).

    It leaves the desired-state generation alone: what agents are offered changes only
    through their assignments, and the resolver logs each agent whose assignment changes.
    """
    global _definitions
    token = secrets.token_hex(16)
    updated = DesiredStateGeneration.objects.filter(pk=1).update(definitions=token)
    if not updated:
        _, created = DesiredStateGeneration.objects.get_or_create(pk=1, defaults={"definitions": token})
        if not created:  # another transaction inserted the row meanwhile
            DesiredStateGeneration.objects.filter(pk=1).update(definitions=token)
    _definitions = None


def definitions_token() -> str:
    return DesiredStateGeneration.objects.filter(pk=1).values_list("definitions", flat=True).first() or ""


def load_definitions(token: str) -> ResolverDefinitions:
    configurations = (
        Configuration.objects.filter(current_version__isnull=False)
        .order_by("-priority", "name")
        .values_list("id", "current_version_id", "selector")
    )
    candidates = tuple(
        CandidateConfiguration(configuration_id, version_id, parse_selector(selector))
        for configuration_id, version_id, selector in configurations
    )
    return ResolverDefinitions(token=token, candidates=candidates, plans=active_rollout_plans())


def resolver_definitions() -> ResolverDefinitions:
    """The active configurations and rollout plans: from this process's cache while the
    token is unchanged, else read again. Without a token (no write since the database was
    created) nothing is cached: rows may have been written by other means."""
    global _definitions
    token = definitions_token()
    cached = _definitions
    if token and cached is not None and cached.token == token:
        return cached
    fresh = load_definitions(token)
    if token:
        _definitions = fresh
    return fresh


def config_files(config_hash: str, *, version_id: int) -> dict[str, dict[str, str]]:
    """The files whose canonical hash is `config_hash`, read from `version_id` on a miss.

    Shared by every caller: treat the result as read-only.
    """
    cached = _files.get(config_hash)
    if cached is not None:
        return cached
    files: dict[str, dict[str, str]] = ConfigVersion.objects.values_list("files", flat=True).get(pk=version_id)
    with _files_lock:
        if len(_files) >= MAX_CACHED_FILES:
            _files.clear()
        _files[config_hash] = files
    return files


def clear() -> None:
    """Forget everything cached in this process (tests; a restart does the same)."""
    global _definitions
    _definitions = None
    with _files_lock:
        _files.clear()
