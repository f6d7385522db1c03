"""Configurations, their immutable versions, and each agent's desired configuration."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from fleet.models import Agent


class Configuration(models.Model):
    """A named configuration delivered to the agents its label selector matches.

    When several configurations match an agent, the highest priority wins (ties: name).
    `current_version` is what matching agents are given; publishing moves it forward.
    """

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    # Canonical dict form of a Kubernetes-style label selector (rollouts.label_selectors).
    selector = models.JSONField(default=dict, blank=True)
    priority = models.IntegerField(default=0)
    current_version = models.ForeignKey(
        "ConfigVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "name"]

    def __str__(self) -> str:
        return self.name


class ConfigVersion(models.Model):
    """One immutable version of a configuration: named files and their canonical SHA-256.

    Never updated after creation. Rolling back creates a new version (a higher number)
    with an earlier version's content, so version numbers only ever go up.
    """

    configuration = models.ForeignKey(Configuration, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    # {file name: {"body": text, "content_type": str}}
    files = models.JSONField()
    config_hash = models.CharField(max_length=64, db_index=True)
    size_bytes = models.PositiveIntegerField(default=0)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    note = models.TextField(blank=True)
    rolled_back_from = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="the earlier version whose content this version restores",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["configuration", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["configuration", "number"], name="config_version_number_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.configuration.name} v{self.number}"


class AgentDesiredConfig(models.Model):
    """The configuration version an agent should run, as decided by the resolver.

    Kept apart from fleet.Agent so the inventory does not depend on this app. `offered_*`
    records the last offer, so an agent that ignores or fails an offer is not sent the
    same content on every heartbeat.
    """

    agent = models.OneToOneField(Agent, primary_key=True, on_delete=models.CASCADE, related_name="desired_config")
    configuration = models.ForeignKey(Configuration, on_delete=models.CASCADE, related_name="assignments")
    version = models.ForeignKey(ConfigVersion, on_delete=models.CASCADE, related_name="assignments")
    offered_hash = models.CharField(max_length=64, blank=True)
    offered_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["version"], name="desired_config_version_idx")]

    def __str__(self) -> str:
        return f"{self.agent_id} -> {self.version}"


class DesiredStateGeneration(models.Model):
    """A single counter bumped by every change of desired state.

    Server processes read it at most once per second and reload an agent's desired
    config when it moved; pushes over the channel layer are only a faster path.
    """

    value = models.BigIntegerField(default=0)


class AuditEvent(models.Model):
    """Who changed what, when: one row per write made through the API or the admin."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=100)
    target_type = models.CharField(max_length=100)
    target_id = models.CharField(max_length=200)
    details = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target_type}:{self.target_id}"
