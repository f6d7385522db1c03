"""Writes for configurations, versions and agent labels. Each is one transaction, audited,
and re-resolves the desired state of exactly the agents it can affect."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Max

from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from fleet.models import Agent
from rollouts import desired_state
from rollouts.config_files import ConfigLimits, files_hash, files_to_document, parse_config_files
from rollouts.config_signings import config_version_sign
from rollouts.errors import (
    CONFIGURATION_NAME_TAKEN,
    NO_SUCH_VERSION,
    ROLLBACK_TO_CURRENT,
    ROLLOUT_IN_PROGRESS,
)
from rollouts.models import ACTIVE_ROLLOUT_STATES, SIGNED_ON_PUBLISH, SIGNED_ON_ROLLBACK, Configuration, ConfigVersion
from rollouts.resolver_cache import bump_definitions


def config_limits() -> ConfigLimits:
    return ConfigLimits(
        max_file_bytes=settings.OPAMP_CONFIG_MAX_FILE_BYTES,
        max_total_bytes=settings.OPAMP_CONFIG_MAX_TOTAL_BYTES,
        max_files=settings.OPAMP_CONFIG_MAX_FILES,
    )


def _canonical_selector(selector: Any) -> dict[str, Any]:
    try:
        return parse_selector(selector).to_dict()
    except SelectorError as error:
        raise DomainError(str(error), field="selector") from None


@transaction.atomic
def configuration_create(
    *, name: str, selector: Any = None, priority: int = 0, description: str = "", actor: Actor
) -> Configuration:
    if Configuration.objects.filter(name=name).exists():
        raise DomainError(CONFIGURATION_NAME_TAKEN.format(name=name), field="name")
    configuration = Configuration(
        name=name,
        selector=_canonical_selector(selector),
        priority=priority,
        description=description,
        created_by=actor_user(actor),
    )
    configuration.full_clean()
    configuration.save()
    bump_definitions()
    audit_record(
        actor=actor,
        action="configuration.create",
        target=configuration,
        details={"name": name, "selector": configuration.selector, "priority": priority},
    )
    return configuration


@transaction.atomic
def configuration_update(
    *,
    configuration: Configuration,
    actor: Actor,
    name: str | None = None,
    selector: Any = None,
    priority: int | None = None,
    description: str | None = None,
) -> Configuration:
    """Change the configuration's own fields; a new selector or priority re-resolves agents."""
    configuration = Configuration.objects.select_for_update().get(pk=configuration.pk)
    previous_selector = configuration.selector
    changes: dict[str, Any] = {}
    if name is not None and name != configuration.name:
        if Configuration.objects.filter(name=name).exclude(pk=configuration.pk).exists():
            raise DomainError(CONFIGURATION_NAME_TAKEN.format(name=name), field="name")
        changes["name"] = name
    if selector is not None:
        canonical = _canonical_selector(selector)
        if canonical != configuration.selector:
            changes["selector"] = canonical
    if priority is not None and priority != configuration.priority:
        changes["priority"] = priority
    if description is not None and description != configuration.description:
        changes["description"] = description
    if not changes:
        return configuration
    for field, value in changes.items():
        setattr(configuration, field, value)
    configuration.full_clean()
    configuration.save()
    bump_definitions()
    audit_record(actor=actor, action="configuration.update", target=configuration, details=changes)
    if "selector" in changes or "priority" in changes:
        desired_state.resolve_for_configuration(configuration, previous_selector=previous_selector)
    return configuration


@transaction.atomic
def configuration_delete(*, configuration: Configuration, actor: Actor) -> None:
    """Remove a configuration; its agents fall to the next matching configuration, if any."""
    configuration = Configuration.objects.select_for_update().get(pk=configuration.pk)
    _refuse_while_rolling_out(configuration)
    affected = list(configuration.assignments.values_list("agent_id", flat=True))
    # Finished rollouts go with their configuration (they reference its versions).
    configuration.rollouts.all().delete()
    audit_record(actor=actor, action="configuration.delete", target=configuration, details={"name": configuration.name})
    configuration.assignments.all().delete()
    configuration.current_version = None
    configuration.save(update_fields=["current_version"])
    configuration.delete()
    bump_definitions()
    desired_state.resolve_agents(Agent.objects.filter(pk__in=affected))


def _next_number(configuration: Configuration) -> int:
    return int((configuration.versions.aggregate(top=Max("number"))["top"] or 0) + 1)


def _create_version(
    *,
    configuration: Configuration,
    files_document: dict[str, dict[str, str]],
    config_hash: str,
    size_bytes: int,
    author: Actor,
    note: str,
    rolled_back_from: ConfigVersion | None = None,
    activate: bool = True,
) -> ConfigVersion:
    version = ConfigVersion(
        configuration=configuration,
        number=_next_number(configuration),
        files=files_document,
        config_hash=config_hash,
        size_bytes=size_bytes,
        author=actor_user(author),
        note=note,
        rolled_back_from=rolled_back_from,
    )
    version.full_clean()
    version.save()
    # Under the next signing sequence of the configuration (the caller holds its lock), so
    # agents accept a rollback to older content as the newer delivery it is.
    config_version_sign(
        version=version,
        reason=SIGNED_ON_ROLLBACK if rolled_back_from is not None else SIGNED_ON_PUBLISH,
        detail=f"version {version.number}",
    )
    if activate:
        configuration.current_version = version
        configuration.save(update_fields=["current_version", "updated_at"])
    # A candidate (not activated) changes nothing the resolver reads until a rollout
    # names it, and creating the rollout bumps; bumping here too keeps the rule simple.
    bump_definitions()
    return version


def _refuse_while_rolling_out(configuration: Configuration) -> None:
    """A new current version under an active rollout would silently change its stable side."""
    active = configuration.rollouts.filter(state__in=ACTIVE_ROLLOUT_STATES).first()
    if active is not None:
        raise DomainError(
            ROLLOUT_IN_PROGRESS.format(name=configuration.name, rollout_id=active.pk), field="configuration", status=409
        )


@transaction.atomic
def configuration_publish(
    *, configuration: Configuration, files: Any, author: Actor, note: str = "", activate: bool = True
) -> tuple[ConfigVersion, bool]:
    """Publish `files` as the next version; (version, created).

    With `activate` (the default) the version becomes current and is delivered at once;
    without it, it is stored as a candidate for a rollout. Content identical to the current
    version creates nothing and returns it. Content equal to an older version is a new
    version all the same: numbers only go up, so agents that verify version order accept it.
    """
    # The row lock serialises publishers of one configuration: numbers stay gapless.
    configuration = Configuration.objects.select_for_update().get(pk=configuration.pk)
    parsed = parse_config_files(files, limits=config_limits())
    config_hash = files_hash(parsed)
    current = configuration.current_version
    if current is not None and current.config_hash == config_hash:
        return current, False
    if activate:
        _refuse_while_rolling_out(configuration)
    version = _create_version(
        configuration=configuration,
        files_document=files_to_document(parsed),
        config_hash=config_hash,
        size_bytes=sum(len(f.body) for f in parsed.values()),
        author=author,
        note=note,
        activate=activate,
    )
    audit_record(
        actor=author,
        action="configuration.publish" if activate else "configuration.publish_candidate",
        target=version,
        details={"configuration": configuration.name, "number": version.number, "config_hash": config_hash},
    )
    if activate:
        desired_state.resolve_for_configuration(configuration)
    return version, True


@transaction.atomic
def configuration_rollback(
    *, configuration: Configuration, to_number: int, author: Actor, note: str = ""
) -> ConfigVersion:
    """Make version `to_number`'s content current again, as a new version."""
    configuration = Configuration.objects.select_for_update().get(pk=configuration.pk)
    _refuse_while_rolling_out(configuration)
    target = configuration.versions.filter(number=to_number).first()
    if target is None:
        raise DomainError(NO_SUCH_VERSION.format(number=to_number, name=configuration.name), field="version")
    if configuration.current_version_id == target.pk or (
        configuration.current_version is not None and configuration.current_version.config_hash == target.config_hash
    ):
        raise DomainError(ROLLBACK_TO_CURRENT.format(number=to_number), field="version")
    version = _create_version(
        configuration=configuration,
        files_document=target.files,
        config_hash=target.config_hash,
        size_bytes=target.size_bytes,
        author=author,
        note=note or f"rollback to version {target.number}",
        rolled_back_from=target,
    )
    audit_record(
        actor=author,
        action="configuration.rollback",
        target=version,
        details={"configuration": configuration.name, "number": version.number, "restores": target.number},
    )
    desired_state.resolve_for_configuration(configuration)
    return version
