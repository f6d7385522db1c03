"""Configurations, their immutable versions and the signings of those, and each agent's desired configuration."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from fleet.models import Agent


class Configuration(models.Model):
    """A named configuration delivered to the agents its label selector matches.

    When several configurations match an agent, the highest priority wins (ties: name).
    `current_version` is what matching agents are given; publishing moves it forward.
    """

    # One URL path segment (configurations/{name}/): no slash, no leading whitespace.
    name = models.CharField(
        max_length=200,
        unique=True,
        validators=[
            RegexValidator(
                r"^[^/\s][^/]*$", "a configuration name must not be empty, start with a space or contain '/'"
            )
        ],
    )
    description = models.TextField(blank=True)
    # Canonical dict form of a Kubernetes-style label selector (fleet.label_selectors).
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

    Its content never changes after creation. Rolling back creates a new version (a higher number)
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
    # The version's newest Ed25519-signed envelope (opamp.config_signature.SignedConfig as
    # JSON), the one delivered: a copy of its newest ConfigSigning, replaced when a
    # rollout transition signs the version anew. Empty when no signing key is configured.
    # The only field that changes after creation.
    signature = models.TextField(blank=True)
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


# Why a version was signed, as plain strings for the code that passes them around (the
# choices' members are typed as tuples by tools that do not know TextChoices).
SIGNED_ON_PUBLISH = "publish"
SIGNED_ON_ROLLBACK = "rollback"
SIGNED_FOR_DELIVERY = "rollout"


class ConfigSigning(models.Model):
    """One signed delivery of a configuration version: its envelope under a sequence.

    A version is signed when it is published and signed anew, under a sequence above every
    one issued before for its configuration, whenever it becomes what agents should run
    again while another version's signing is newer (a rollout started, stepped, promoted or
    retried; an abort or an automatic rollback to stable). Agents refuse a sequence lower
    than the one they run, so going back to older content needs the fresh signing; older
    signings stay valid for the agents that run them. Sequences are allocated under the
    configuration's row lock; the unique constraint makes the database refuse a reuse.
    `ConfigVersion.signature` holds a copy of the version's newest `document`, the one
    delivered (read per agent on the delivery path, without a join).
    """

    class Reason(models.TextChoices):
        PUBLISH = SIGNED_ON_PUBLISH, "published"
        ROLLBACK = SIGNED_ON_ROLLBACK, "rolled back to"
        ROLLOUT = SIGNED_FOR_DELIVERY, "made desired again"
        MIGRATED = "migrated", "signed before sequences"

    configuration = models.ForeignKey(Configuration, on_delete=models.CASCADE, related_name="signings")
    version = models.ForeignKey(ConfigVersion, on_delete=models.CASCADE, related_name="signings")
    sequence = models.PositiveBigIntegerField()
    key_id = models.CharField(max_length=16)
    issued_at = models.DateTimeField()
    # opamp.config_signature.SignedConfig as JSON: the bytes agents receive.
    document = models.TextField()
    reason = models.CharField(max_length=16, choices=Reason.choices)
    detail = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # The table the signing app created; the model moved here with its rows.
        db_table = "signing_configsigning"
        ordering = ["configuration", "-sequence"]
        constraints = [
            models.UniqueConstraint(fields=["configuration", "sequence"], name="config_signing_sequence_unique"),
        ]
        indexes = [models.Index(fields=["version", "-sequence"], name="config_signing_version_idx")]

    def __str__(self) -> str:
        return f"{self.configuration_id} #{self.sequence} (version {self.version_id})"


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
    """A single row: a counter moved by every change of agents' desired assignments, and a
    token that changes with every change of what the resolver reads besides agents.

    Every transaction that changes assignments moves `value` by one and logs the agents it
    changed under the new value (DesiredStateChange). The UPDATE holds this row's lock
    until commit, so committed values are gapless and commit in order: a reader that sees
    value N can read the log up to N and find every change. Server processes do so at most
    once per second and drop only those agents' cached desired config; pushes over the
    channel layer are only a faster path. `pruned_through` is the highest value whose log
    rows may be gone: a process further behind than that forgets its whole cache.

    `definitions` is replaced by a fresh random token whenever a configuration, a current
    version or a rollout changes; processes cache the active configurations and rollout
    plans under it (rollouts.resolver_cache). It is random rather than counted because a
    rolled-back transaction can leave a cache entry keyed by a value it wrote: a counter
    would hand the same value to the next writer, a random token never does.
    """

    value = models.BigIntegerField(default=0)
    definitions = models.CharField(max_length=32, blank=True, default="", db_default="")
    pruned_through = models.BigIntegerField(default=0, db_default=0)
    # Like `definitions`, for what the package resolver reads: package assignments and the
    # files of the versions they name (rollouts.package_assignments).
    packages = models.CharField(max_length=32, blank=True, default="", db_default="")


class DesiredStateChange(models.Model):
    """The log of DesiredStateGeneration: the agents (ids) that got a new assignment, or
    lost theirs, in the transaction that moved the generation to `generation`.

    One row per transaction with the ids as a list: a rollout stage of 18,000 agents is
    one INSERT, and a process catching up reads one row per generation it missed. Plain
    ids, not foreign keys: the log outlives deleted agents until it is pruned.
    """

    generation = models.BigIntegerField(unique=True)
    agent_ids = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)


class RolloutState(models.TextChoices):
    DRAFT = "draft", "draft"
    RUNNING = "running", "running"
    PAUSED = "paused", "paused"
    SUCCEEDED = "succeeded", "succeeded"
    ROLLING_BACK = "rolling_back", "rolling back"
    ROLLED_BACK = "rolled_back", "rolled back"
    ABORTED = "aborted", "aborted"


# States in which a rollout decides what its configuration's agents run.
ACTIVE_ROLLOUT_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK)

# The relations that name a rollout's subject and its two versions (configuration or
# package): what every view of a rollout reads with it.
ROLLOUT_SUBJECT_RELATIONS = (
    "configuration",
    "stable_version",
    "candidate_version",
    "package",
    "stable_package_version",
    "candidate_package_version",
)


class Rollout(models.Model):
    """Moves agents from a stable version to a candidate version in stages. Its subject is
    a configuration (`stable_version` -> `candidate_version`) or a package
    (`stable_package_version` -> `candidate_package_version`), never both: the engine is
    the same (rollouts.rollout_subjects says what differs).

    State changes happen only in `rollouts.rollout_services.verbs.transition`, each as a
    conditional UPDATE on (state, stage_index), so a duplicated or stale Celery task cannot
    repeat one.
    """

    configuration = models.ForeignKey(
        Configuration, null=True, blank=True, on_delete=models.CASCADE, related_name="rollouts"
    )
    stable_version = models.ForeignKey(ConfigVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    candidate_version = models.ForeignKey(
        ConfigVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    package = models.ForeignKey("Package", null=True, blank=True, on_delete=models.PROTECT, related_name="rollouts")
    stable_package_version = models.ForeignKey(
        "PackageVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    candidate_package_version = models.ForeignKey(
        "PackageVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    state = models.CharField(max_length=16, choices=RolloutState.choices, default=RolloutState.DRAFT)
    stage_index = models.IntegerField(default=0)
    stage_started_at = models.DateTimeField(null=True, blank=True)
    # When a gate tick last read this rollout while it ran or rolled back: no tick runs while
    # the Celery broker (Redis) is down, and only this tells the operator so.
    gate_checked_at = models.DateTimeField(null=True, blank=True)
    # Failed (or unhealthy after applying) / reported agents above this rolls back.
    max_failure_rate = models.FloatField(default=0.001)
    # An agent that has not answered this long after the offer no longer holds the stage.
    apply_timeout_seconds = models.FloatField(default=300)
    # Fewer reports than this is "no data": the stage holds, never promotes.
    min_reporting = models.PositiveIntegerField(default=1)
    auto_rollback = models.BooleanField(default=True)
    # Mixed into every agent's bucket, so each rollout draws its own cohorts.
    salt = models.CharField(max_length=64)
    note = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["configuration"],
                condition=models.Q(state__in=["running", "paused", "rolling_back"]),
                name="one_active_rollout_per_configuration",
            ),
            models.UniqueConstraint(
                fields=["package"],
                condition=models.Q(state__in=["running", "paused", "rolling_back"]),
                name="one_active_rollout_per_package",
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(
                        configuration__isnull=False,
                        stable_version__isnull=False,
                        candidate_version__isnull=False,
                        package__isnull=True,
                        stable_package_version__isnull=True,
                        candidate_package_version__isnull=True,
                    )
                    | models.Q(
                        configuration__isnull=True,
                        stable_version__isnull=True,
                        candidate_version__isnull=True,
                        package__isnull=False,
                        stable_package_version__isnull=False,
                        candidate_package_version__isnull=False,
                    )
                ),
                name="rollout_one_subject",
            ),
        ]

    @property
    def is_package(self) -> bool:
        return self.package_id is not None

    @property
    def subject_name(self) -> str:
        """The configuration's or the package's name."""
        subject = self.package if self.is_package else self.configuration
        return subject.name if subject is not None else ""

    @property
    def stable_label(self) -> str:
        if self.is_package:
            return self.stable_package_version.version if self.stable_package_version else ""
        return f"v{self.stable_version.number}" if self.stable_version else ""

    @property
    def candidate_label(self) -> str:
        if self.is_package:
            return self.candidate_package_version.version if self.candidate_package_version else ""
        return f"v{self.candidate_version.number}" if self.candidate_version else ""

    def __str__(self) -> str:
        kind = "package " if self.is_package else ""
        return f"rollout {self.pk} of {kind}{self.subject_name}: {self.stable_label} -> {self.candidate_label}"


class RolloutStage(models.Model):
    """One step: a cumulative share of the fleet (percent or count), a hold, an optional gate."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="stages")
    index = models.PositiveIntegerField()
    percent = models.FloatField(null=True, blank=True)
    count = models.PositiveIntegerField(null=True, blank=True)
    selector = models.JSONField(default=dict, blank=True)
    hold_seconds = models.FloatField(default=0)
    requires_approval = models.BooleanField(default=False)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    approved_at = models.DateTimeField(null=True, blank=True)
    # Agents whose bucket (0..9999) is below this belong to this stage or an earlier one;
    # fixed when the rollout starts (count stages need the population then).
    bucket_threshold = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["rollout", "index"]
        constraints = [models.UniqueConstraint(fields=["rollout", "index"], name="rollout_stage_index_unique")]

    def __str__(self) -> str:
        size = f"{self.percent}%" if self.percent is not None else f"{self.count} agents"
        return f"stage {self.index} ({size})"

    @property
    def size_display(self) -> str:
        """The stage's share as the admin and the dashboard show it: "25%" or "40 agents"."""
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count} agents"


class RolloutTarget(models.Model):
    """An agent given the candidate by a rollout: its cohort, the offer and its answer."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="targets")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="rollout_targets")
    stage_index = models.PositiveIntegerField()
    bucket = models.PositiveIntegerField()
    assigned_at = models.DateTimeField()
    offered_hash = models.CharField(max_length=64, blank=True)
    offered_at = models.DateTimeField(null=True, blank=True)
    answer = models.CharField(max_length=16, blank=True)  # applying / applied / failed
    answered_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["rollout", "agent"], name="rollout_target_unique")]
        indexes = [models.Index(fields=["rollout", "stage_index"], name="rollout_target_stage_idx")]

    def __str__(self) -> str:
        return f"{self.agent_id} in stage {self.stage_index} of rollout {self.rollout_id}"


class RolloutEvent(models.Model):
    """A rollout's timeline: every transition and notable decision, with the counts behind it."""

    class Kind(models.TextChoices):
        CREATED = "created"
        STARTED = "started"
        STAGE_STARTED = "stage_started"
        AWAITING_APPROVAL = "awaiting_approval"
        APPROVED = "approved"
        PAUSED = "paused"
        RESUMED = "resumed"
        PROMOTED = "promoted"
        BUDGET_EXCEEDED = "budget_exceeded"
        ROLLBACK_STARTED = "rollback_started"
        ROLLED_BACK = "rolled_back"
        SUCCEEDED = "succeeded"
        ABORTED = "aborted"
        RETRIED = "retried"

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16, blank=True)
    stage_index = models.IntegerField(null=True, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    message = models.TextField(blank=True)
    counts = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["rollout", "at", "id"]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.kind} ({self.from_state} -> {self.to_state})"


class ReconcilerState(models.Model):
    """A single row: where the desired-state reconciler stopped and what it has found.

    Each run checks the next batch of agents by id after `cursor_agent_id` and wraps to the
    start after the last one (rollouts.reconciler). `repairs_total` counts assignments that
    differed from the resolver's answer and were rewritten: in a healthy system it stays 0,
    so any other value is a bug to look for in the logs.
    """

    cursor_agent_id = models.BigIntegerField(default=0)
    runs = models.BigIntegerField(default=0)
    passes_completed = models.BigIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_run_checked = models.IntegerField(default=0)
    last_run_repaired = models.IntegerField(default=0)
    repairs_total = models.BigIntegerField(default=0)
    last_repair_at = models.DateTimeField(null=True, blank=True)

    # What the API and the admin show of it, in this order.
    SHOWN_FIELDS = (
        "runs",
        "passes_completed",
        "cursor_agent_id",
        "last_run_at",
        "last_run_checked",
        "last_run_repaired",
        "repairs_total",
        "last_repair_at",
    )

    class Meta:
        verbose_name = "desired-state reconciler"
        verbose_name_plural = "desired-state reconciler"

    def __str__(self) -> str:
        return f"reconciler: {self.runs} runs, {self.repairs_total} repairs"


class RolloutSample(models.Model):
    """The gate's counts of one stage at one rollout tick, for the failure-rate chart.

    Written by rollouts.rollout_samples: only when the counts changed or a while has passed,
    at most SAMPLES_PER_STAGE per (rollout, stage) (older ones are thinned), removed with
    the rollout or after SAMPLE_RETENTION.
    """

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="samples")
    stage = models.PositiveSmallIntegerField()
    at = models.DateTimeField()
    answered = models.PositiveIntegerField()
    failed = models.PositiveIntegerField()
    reachable = models.PositiveIntegerField()

    class Meta:
        indexes = [
            models.Index(fields=["rollout", "stage", "at"], name="rollout_sample_series_idx"),
            models.Index(fields=["at"], name="rollout_sample_at_idx"),
        ]

    def __str__(self) -> str:
        return f"rollout {self.rollout_id} stage {self.stage} at {self.at:%H:%M:%S}: {self.failed}/{self.reachable}"

    @property
    def failure_rate(self) -> float:
        return self.failed / self.reachable if self.reachable > 0 else 0.0


# --- Packages -----------------------------------------------------------------------------

# One URL path segment (packages/{name}/versions/{version}/): no slash, no leading whitespace.
PATH_SEGMENT = RegexValidator(r"^[^/\s][^/]*$", "must not be empty, start with a space or contain '/'")


class PackageType(models.TextChoices):
    """Mirrors PackageType on the wire."""

    TOP_LEVEL = "top_level", "top-level"
    ADDON = "addon", "add-on"


class Package(models.Model):
    """A package agents may be given (OpAMP PackagesAvailable), by name."""

    name = models.CharField(max_length=200, unique=True, validators=[PATH_SEGMENT])
    type = models.CharField(max_length=16, choices=PackageType.choices, default=PackageType.TOP_LEVEL)
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PackageVersion(models.Model):
    """One version of a package: immutable once created; files are added one per platform,
    never replaced (a file's bytes are what its signature and agents' hashes name)."""

    package = models.ForeignKey(Package, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=200, validators=[PATH_SEGMENT])
    note = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["package_id", "-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["package", "version"], name="package_version_unique")]

    def __str__(self) -> str:
        return f"{self.package.name} {self.version}"


class PackageFile(models.Model):
    """The file of a version for one platform (`os`, `arch` as agents report `os.type` and
    `host.arch`; both empty: for every platform), stored through the `packages` storage.

    `sha256` and `size` are of the exact bytes stored and served; `signature` is the
    opamp.package_signature document over them (empty when no signing key is configured).
    """

    version = models.ForeignKey(PackageVersion, on_delete=models.PROTECT, related_name="files")
    os = models.CharField(max_length=64, blank=True)
    arch = models.CharField(max_length=64, blank=True)
    storage_name = models.CharField(max_length=500, unique=True)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    signature = models.TextField(blank=True)
    key_id = models.CharField(max_length=16, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["version_id", "os", "arch"]
        constraints = [models.UniqueConstraint(fields=["version", "os", "arch"], name="package_file_platform_unique")]

    def __str__(self) -> str:
        return f"{self.version} {self.os or 'any'}/{self.arch or 'any'}"


class PackageAssignment(models.Model):
    """Which version of a package the agents a label selector matches should have.

    Per package, the highest-priority matching assignment wins (ties: name), as for
    configurations.
    """

    name = models.CharField(max_length=200, unique=True, validators=[PATH_SEGMENT])
    package = models.ForeignKey(Package, on_delete=models.PROTECT, related_name="assignments")
    version = models.ForeignKey(PackageVersion, on_delete=models.PROTECT, related_name="assignments")
    # Canonical dict form of a label selector (fleet.label_selectors).
    selector = models.JSONField(default=dict, blank=True)
    priority = models.IntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "name"]

    def __str__(self) -> str:
        return self.name
