"""Admin for configurations, their versions and their rollouts.

Every write goes through `rollouts.services` (so it is validated, audited and re-resolves
the agents it affects); the forms only check input early, with the same parsers the
services use, so that problems show up as form errors. The role rules of the API apply
here too (`fleet.roles`); the admin itself additionally requires staff status.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db.models import Count, Model, QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join

import rollouts.beat_admin  # noqa: F401  (Celery beat's schedule models leave the index)
from fleet.admin_base import ReadOnlyRoleAdminMixin, RoleAdminMixin, ServiceErrorsAsMessagesMixin
from fleet.errors import DomainError
from fleet.label_selectors import SelectorError, parse_selector
from fleet.roles import can_write
from rollouts import selectors
from rollouts.api import rollout_serializers
from rollouts.api.serializers import CONFIGURATION_NAME_INVALID, CONFIGURATION_NAME_REGEX
from rollouts.config_files import ConfigValidationError, parse_config_files
from rollouts.errors import NO_SUCH_VERSION
from rollouts.models import (
    AgentDesiredConfig,
    Configuration,
    ConfigVersion,
    ReconcilerState,
    Rollout,
    RolloutEvent,
    RolloutState,
)
from rollouts.rollout_services import answers, creation, verbs
from rollouts.services import (
    config_limits,
    configuration_create,
    configuration_delete,
    configuration_publish,
    configuration_rollback,
    configuration_update,
)

# What a service may refuse after the form accepted the input (e.g. a name taken meanwhile).
SELECTOR_HELP = (
    "The short form, e.g. <code>env=prod,tier in (edge,core),!legacy</code>, or the JSON form "
    "<code>{&quot;matchLabels&quot;: {...}, &quot;matchExpressions&quot;: [...]}</code>. Empty selects every agent."
)
FILES_HELP = (
    'JSON: <code>{"collector.yaml": {"body": "receivers: ...", "content_type": "text/yaml"}}</code>. '
    "Content types: YAML, JSON or text/plain."
)
NOT_PUBLISHED = "The files are identical to the current version {number} of {name}; no new version was made."


def _become(obj: Model, saved: Model) -> None:
    """Make the admin's unsaved instance the row the service saved, so the admin's own
    follow-up (log entry, redirect to the change page) refers to that row."""
    obj.__dict__.update(saved.__dict__)


# Configurations


class ConfigurationForm(forms.ModelForm):
    name = forms.CharField(
        max_length=200, validators=[RegexValidator(CONFIGURATION_NAME_REGEX, CONFIGURATION_NAME_INVALID)]
    )
    selector = forms.CharField(
        required=False, strip=True, widget=forms.Textarea(attrs={"rows": 3, "cols": 80}), help_text=SELECTOR_HELP
    )

    class Meta:
        model = Configuration
        fields = ["name", "description", "selector", "priority"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            # Every valid selector has a short form, and it is what operators write.
            self.initial["selector"] = parse_selector(self.instance.selector).to_string()

    def clean_selector(self) -> dict[str, Any]:
        text = self.cleaned_data.get("selector") or ""
        try:
            raw = json.loads(text) if text.startswith("{") else text
            return parse_selector(raw).to_dict()
        except json.JSONDecodeError as error:
            raise ValidationError(f"invalid JSON: {error}") from None
        except SelectorError as error:
            raise ValidationError(str(error)) from None


class ConfigVersionInline(RoleAdminMixin, admin.TabularInline):
    model = ConfigVersion
    fk_name = "configuration"
    fields = ["number", "config_hash", "author", "created_at", "note", "rolled_back_from", "size_bytes"]
    readonly_fields = fields
    ordering = ["-number"]
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "versions (immutable; publish a new one to change the files)"

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[ConfigVersion]:
        return super().get_queryset(request).select_related("author", "rolled_back_from", "configuration")


@admin.register(Configuration)
class ConfigurationAdmin(ServiceErrorsAsMessagesMixin, RoleAdminMixin, admin.ModelAdmin):
    form = ConfigurationForm
    list_display = ["name", "priority", "selector_string", "current_version_display", "agent_count"]
    search_fields = ["name", "description"]
    readonly_fields = [
        "current_version_display",
        "agent_count",
        "publish_link",
        "created_by",
        "created_at",
        "updated_at",
    ]
    fieldsets = [
        (None, {"fields": ["name", "description", "selector", "priority"]}),
        (
            "Delivery",
            {
                "fields": [
                    "current_version_display",
                    "agent_count",
                    "publish_link",
                    "created_by",
                    "created_at",
                    "updated_at",
                ]
            },
        ),
    ]
    inlines = [ConfigVersionInline]
    actions = ["roll_back_to_previous_version"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Configuration]:
        return selectors.configuration_list().select_related("created_by")

    def get_fieldsets(self, request: HttpRequest, obj: Configuration | None = None) -> list[Any]:
        return self.fieldsets[:1] if obj is None else self.fieldsets

    def get_inlines(self, request: HttpRequest, obj: Configuration | None = None) -> list[Any]:
        return [] if obj is None else self.inlines

    @admin.display(description="selector")
    def selector_string(self, configuration: Configuration) -> str:
        return parse_selector(configuration.selector).to_string() or "(every agent)"

    @admin.display(description="current version")
    def current_version_display(self, configuration: Configuration) -> str:
        version = configuration.current_version
        if version is None:
            return "—"
        url = reverse("admin:rollouts_configversion_change", args=[version.pk])
        return format_html('<a href="{}">v{}</a> <code>{}</code>', url, version.number, version.config_hash[:12])

    @admin.display(description="agents", ordering="agent_count")
    def agent_count(self, configuration: Configuration) -> int:
        return int(getattr(configuration, "agent_count", 0))

    @admin.display(description="publish")
    def publish_link(self, configuration: Configuration) -> str:
        url = reverse("admin:rollouts_configversion_add") + f"?configuration={configuration.pk}"
        return format_html('<a href="{}">Publish a new version</a>', url)

    def save_model(self, request: HttpRequest, obj: Configuration, form: ConfigurationForm, change: bool) -> None:
        fields = {name: form.cleaned_data[name] for name in ("name", "selector", "priority", "description")}
        if change:
            saved = configuration_update(configuration=obj, actor=request.user, **fields)
        else:
            saved = configuration_create(actor=request.user, **fields)
        _become(obj, saved)

    def delete_model(self, request: HttpRequest, obj: Configuration) -> None:
        configuration_delete(configuration=obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Configuration]) -> None:
        for configuration in queryset:
            configuration_delete(configuration=configuration, actor=request.user)

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        """Deleting a configuration takes its versions and assignments with it, and the
        operator role is all the permission that needs. The PROTECT on `current_version`
        names the configuration itself as protecting its current version; the service
        unlinks it first, so only protections from elsewhere are real."""
        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        if can_write(request.user):
            perms_needed = set()
        own_links = {f'href="{reverse("admin:rollouts_configuration_change", args=[quote(c.pk)])}"' for c in objs}
        protected = [item for item in protected if not any(link in str(item) for link in own_links)]
        return deleted, model_count, perms_needed, protected

    @admin.action(description="Roll back to the previous version", permissions=["change"])
    def roll_back_to_previous_version(self, request: HttpRequest, queryset: QuerySet[Configuration]) -> None:
        for configuration in queryset:
            current = configuration.current_version
            previous = (
                None
                if current is None
                else selectors.version_list(configuration)
                .filter(number__lt=current.number)
                .exclude(config_hash=current.config_hash)
                .first()
            )
            if previous is None:
                self.message_user(
                    request, f"{configuration.name}: no earlier version to roll back to", messages.WARNING
                )
                continue
            try:
                version = configuration_rollback(
                    configuration=configuration, to_number=previous.number, author=request.user
                )
            except DomainError as error:
                self.message_user(request, f"{configuration.name}: {error.message}", messages.ERROR)
                continue
            self.message_user(
                request, f"{configuration.name}: version {version.number} restores version {previous.number}"
            )


# Versions


class PublishForm(forms.ModelForm):
    files = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 18, "cols": 100, "style": "font-family: monospace"}), help_text=FILES_HELP
    )

    class Meta:
        model = ConfigVersion
        fields = ["configuration", "files", "note"]

    def clean_files(self) -> Any:
        try:
            document = json.loads(self.cleaned_data["files"])
        except json.JSONDecodeError as error:
            raise ValidationError(f"the files are not valid JSON: {error}") from None
        try:
            parse_config_files(document, limits=config_limits())
        except ConfigValidationError as error:
            raise ValidationError(error.problems) from None
        return document


@admin.register(ConfigVersion)
class ConfigVersionAdmin(ServiceErrorsAsMessagesMixin, RoleAdminMixin, admin.ModelAdmin):
    """Versions are immutable: the add form publishes, the change page only shows."""

    list_display = ["__str__", "short_hash", "author", "created_at", "note", "size_bytes"]
    list_filter = ["configuration"]
    list_select_related = ["configuration", "author"]
    search_fields = ["configuration__name", "config_hash", "note"]
    detail_fields = [
        "configuration",
        "number",
        "config_hash",
        "author",
        "created_at",
        "note",
        "rolled_back_from",
        "size_bytes",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ConfigVersion]:
        return super().get_queryset(request).select_related("configuration", "author", "rolled_back_from")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_form(
        self, request: HttpRequest, obj: ConfigVersion | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = PublishForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: ConfigVersion | None = None) -> list[Any]:
        if obj is None:
            return [(None, {"fields": ["configuration", "files", "note"]})]
        return [
            (None, {"fields": self.detail_fields}),
            ("Files", {"fields": ["files_display"]}),
            ("Agents", {"fields": ["status_counts"]}),
            ("Changes since the previous version", {"fields": ["diff_to_previous"]}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: ConfigVersion | None = None) -> list[str]:
        if obj is None:
            return []
        return [*self.detail_fields, "files_display", "status_counts", "diff_to_previous"]

    @admin.display(description="hash")
    def short_hash(self, version: ConfigVersion) -> str:
        return version.config_hash[:12]

    @admin.display(description="files")
    def files_display(self, version: ConfigVersion) -> str:
        return format_html_join(
            "",
            "<h4>{} <small>({})</small></h4><pre style='white-space: pre-wrap'>{}</pre>",
            (
                (name, entry.get("content_type", ""), entry.get("body", ""))
                for name, entry in sorted(version.files.items())
            ),
        )

    @admin.display(description="status of the agents meant to run it")
    def status_counts(self, version: ConfigVersion) -> str:
        counts = selectors.version_status_counts(version)
        return format_html_join(", ", "{}: {}", counts.items())

    @admin.display(description="diff")
    def diff_to_previous(self, version: ConfigVersion) -> str:
        previous = selectors.version_list(version.configuration).filter(number__lt=version.number).first()
        if previous is None:
            return "— (the first version)"
        diffs = selectors.version_diff(previous, version)
        if not diffs:
            return f"— (same content as version {previous.number})"
        return format_html_join("", "<h4>{}</h4><pre style='white-space: pre-wrap'>{}</pre>", diffs.items())

    def save_model(self, request: HttpRequest, obj: ConfigVersion, form: PublishForm, change: bool) -> None:
        configuration = form.cleaned_data["configuration"]
        version, created = configuration_publish(
            configuration=configuration,
            files=form.cleaned_data["files"],
            author=request.user,
            note=form.cleaned_data["note"],
        )
        _become(obj, version)
        obj._published = created
        if not created:
            self.message_user(
                request, NOT_PUBLISHED.format(number=version.number, name=configuration.name), messages.WARNING
            )

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if getattr(obj, "_published", True):
            return super().log_addition(request, obj, message)
        return None

    def response_add(self, request: HttpRequest, obj: ConfigVersion, post_url_continue: str | None = None) -> Any:
        if not getattr(obj, "_published", True):
            # Nothing was added: show the existing version without the "added" message.
            return HttpResponseRedirect(reverse("admin:rollouts_configversion_change", args=[obj.pk]))
        return super().response_add(request, obj, post_url_continue)


@admin.register(AgentDesiredConfig)
class AgentDesiredConfigAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["agent", "configuration", "version", "offered_hash", "offered_at", "updated_at"]
    list_filter = ["configuration"]
    list_select_related = ["agent", "configuration", "version__configuration"]
    search_fields = ["agent__instance_uid", "configuration__name"]


@admin.register(ReconcilerState)
class ReconcilerStateAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    """The reconciler's counters: a non-zero repair count means assignments went wrong."""

    list_display = [
        "__str__",
        "last_run_at",
        "last_run_checked",
        "last_run_repaired",
        "repairs_total",
        "last_repair_at",
    ]
    fields = list(ReconcilerState.SHOWN_FIELDS)
    readonly_fields = fields


# Rollouts

STAGES_HELP = (
    "JSON: a list of cumulative stages, e.g. "
    '<code>[{"percent": 1, "hold_seconds": 3600}, {"percent": 10, "hold_seconds": 3600}, {"percent": 100}]</code>. '
    "Each stage gives <code>percent</code> or <code>count</code>, and may give <code>selector</code>, "
    "<code>hold_seconds</code> and <code>requires_approval</code>."
)
ROLLOUT_VERB_DONE = "rollout {rollout_id}: {done}"
ROLLOUT_VERB_RACED = "rollout {rollout_id}: not {done}; it changed meanwhile, so nothing was done"
NOTHING_TO_APPROVE = "rollout {rollout_id}: no later stage is waiting for approval"
STAGE_COLUMNS = (
    "stage",
    "size (cumulative)",
    "selector",
    "hold",
    "approval",
    "targeted",
    "applied",
    "unhealthy",
    "failed",
    "pending",
    "timed out",
    "offline",
    "failure rate",
)
STAGES_NOT_A_LIST = "the stages must be a JSON list of objects"
STAGE_UNKNOWN_FIELD = "stage {index}: unknown field {name!r}; a stage has {known}"


class RolloutAddForm(forms.ModelForm):
    """Input for `rollout_create`; the stage rules themselves are the engine's (refusals
    come back as messages)."""

    candidate_version = forms.IntegerField(min_value=1, help_text="the version number to roll out")
    stages = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "cols": 100, "style": "font-family: monospace"}), help_text=STAGES_HELP
    )
    salt = forms.CharField(
        required=False, max_length=64, help_text="mixed into every agent's bucket; empty draws a random one"
    )

    class Meta:
        model = Rollout
        fields = [
            "configuration",
            "candidate_version",
            "stages",
            "max_failure_rate",
            "apply_timeout_seconds",
            "min_reporting",
            "auto_rollback",
            "salt",
            "note",
        ]

    def clean_stages(self) -> list[creation.StageSpec]:
        try:
            document = json.loads(self.cleaned_data["stages"])
        except json.JSONDecodeError as error:
            raise ValidationError(f"the stages are not valid JSON: {error}") from None
        if not isinstance(document, list) or not all(isinstance(stage, dict) for stage in document):
            raise ValidationError(STAGES_NOT_A_LIST)
        known = set(rollout_serializers.StageInputSerializer().fields)
        unknown = [
            STAGE_UNKNOWN_FIELD.format(index=index, name=name, known=", ".join(sorted(known)))
            for index, stage in enumerate(document)
            for name in stage
            if name not in known
        ]
        if unknown:
            # A misspelt "requires_approval" must not silently drop the gate.
            raise ValidationError(unknown)
        # The API's shape check, so both say the same about a malformed stage.
        serializer = rollout_serializers.StageInputSerializer(data=document, many=True)
        if not serializer.is_valid():
            errors = serializer.errors
            items = errors.items() if isinstance(errors, dict) else enumerate(errors)
            raise ValidationError(
                [
                    f"stage {index}: {name}: {' '.join(str(message) for message in problems)}"
                    for index, stage_errors in items
                    for name, problems in stage_errors.items()
                ]
            )
        return [creation.StageSpec(**stage) for stage in serializer.validated_data]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        configuration, number = data.get("configuration"), data.get("candidate_version")
        if configuration is not None and number is not None:
            version = selectors.version_list(configuration).filter(number=number).first()
            if version is None:
                self.add_error("candidate_version", NO_SUCH_VERSION.format(name=configuration.name, number=number))
            else:
                # The model field of the same name: the instance the form builds gets the version.
                data["candidate_version"] = version
        return data


class RolloutEventInline(RoleAdminMixin, admin.TabularInline):
    model = RolloutEvent
    fields = ["at", "kind", "from_state", "to_state", "stage_index", "actor", "message", "counts_display"]
    readonly_fields = fields
    ordering = ["at", "id"]
    extra = 0
    can_delete = False
    verbose_name_plural = "timeline"

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[RolloutEvent]:
        return super().get_queryset(request).select_related("actor")

    @admin.display(description="counts")
    def counts_display(self, event: RolloutEvent) -> str:
        if not event.counts:
            return "—"
        return format_html_join(", ", "{}: {}", sorted(event.counts.items()))


def _stage_size(percent: float | None, count: int | None) -> str:
    return f"{percent:g}%" if percent is not None else f"{count} agents"


@admin.register(Rollout)
class RolloutAdmin(ServiceErrorsAsMessagesMixin, RoleAdminMixin, admin.ModelAdmin):
    """Rollouts are read here and moved by the engine's verbs (the actions); nothing is
    edited through a form. The add form only creates a draft through `rollout_create`."""

    list_display = ["id", "configuration", "versions", "state", "stage", "stage_count", "created_at"]
    list_display_links = ["id"]
    list_filter = ["state", "configuration"]
    search_fields = ["configuration__name", "note"]
    date_hierarchy = "created_at"
    detail_fields = [
        "configuration",
        "stable_version",
        "candidate_version",
        "state",
        "stage_index",
        "stage_started_at",
        "max_failure_rate",
        "apply_timeout_seconds",
        "min_reporting",
        "auto_rollback",
        "salt",
        "note",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    ]
    inlines = [RolloutEventInline]
    actions = [
        "start_rollouts",
        "pause_rollouts",
        "resume_rollouts",
        "promote_rollouts",
        "abort_rollouts",
        "retry_rollouts",
        "approve_next_stage",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Rollout]:
        return (
            super()
            .get_queryset(request)
            .select_related("configuration", "stable_version", "candidate_version", "created_by")
            .annotate(stage_total=Count("stages"))
        )

    # Roles: anyone who may read sees rollouts; operators create drafts and run the verbs.

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return can_write(request.user)

    # Pages

    def get_form(self, request: HttpRequest, obj: Rollout | None = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = RolloutAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: Rollout | None = None) -> list[Any]:
        if obj is None:
            return [(None, {"fields": RolloutAddForm.Meta.fields})]
        fieldsets: list[Any] = [
            (None, {"fields": self.detail_fields}),
            ("Stages", {"fields": ["stages_display"]}),
        ]
        if obj.state in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
            fieldsets.append(("Rollback", {"fields": ["rollback_display"]}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Rollout | None = None) -> list[str]:
        if obj is None:
            return []
        return [*self.detail_fields, "stages_display", "rollback_display"]

    def get_inlines(self, request: HttpRequest, obj: Rollout | None = None) -> list[Any]:
        return [] if obj is None else self.inlines

    @admin.display(description="stable → candidate")
    def versions(self, rollout: Rollout) -> str:
        return f"v{rollout.stable_version.number} → v{rollout.candidate_version.number}"

    @admin.display(description="stage")
    def stage(self, rollout: Rollout) -> str:
        return "—" if rollout.state == RolloutState.DRAFT else str(rollout.stage_index)

    @admin.display(description="stages", ordering="stage_total")
    def stage_count(self, rollout: Rollout) -> int:
        return int(getattr(rollout, "stage_total", 0))

    @admin.display(description="stages and their agents")
    def stages_display(self, rollout: Rollout) -> str:
        counts = answers.stage_counts(rollout)
        rows = []
        for stage in rollout.stages.select_related("approved_by"):
            stage_counts = counts.get(stage.index, answers.StageCounts())
            if not stage.requires_approval:
                approval = "not needed"
            elif stage.approved_at is None:
                approval = "awaiting approval"
            else:
                approval = f"approved by {stage.approved_by or 'someone'} at {stage.approved_at:%Y-%m-%d %H:%M:%S}"
            current = rollout.state != RolloutState.DRAFT and stage.index == rollout.stage_index
            rows.append(
                (
                    "▶ " if current else "",
                    stage.index,
                    _stage_size(stage.percent, stage.count),
                    parse_selector(stage.selector).to_string() or "(every agent)",
                    f"{stage.hold_seconds:g} s",
                    approval,
                    stage_counts.targeted,
                    stage_counts.applied,
                    stage_counts.unhealthy,
                    stage_counts.failed,
                    stage_counts.pending,
                    stage_counts.timed_out,
                    stage_counts.offline,
                    f"{stage_counts.failure_rate:.2%}",
                )
            )
        header = format_html_join("", "<th>{}</th>", ((name,) for name in STAGE_COLUMNS))
        body = format_html_join("", "<tr><td>{}{}</td>" + "<td>{}</td>" * (len(STAGE_COLUMNS) - 1) + "</tr>", rows)
        return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", header, body)

    @admin.display(description="agents given the candidate")
    def rollback_display(self, rollout: Rollout) -> str:
        if rollout.state not in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
            return "—"
        return format_html_join(", ", "{}: {}", answers.rollback_progress(rollout).items())

    def save_model(self, request: HttpRequest, obj: Rollout, form: RolloutAddForm, change: bool) -> None:
        data = form.cleaned_data
        rollout = creation.rollout_create(
            configuration=data["configuration"],
            candidate=data["candidate_version"],
            stages=data["stages"],
            actor=request.user,
            max_failure_rate=data["max_failure_rate"],
            apply_timeout_seconds=data["apply_timeout_seconds"],
            min_reporting=data["min_reporting"],
            auto_rollback=data["auto_rollback"],
            salt=data["salt"] or None,
            note=data["note"],
        )
        _become(obj, rollout)

    # Actions: each runs the engine verb per rollout, so one refusal does not stop the rest.

    def _run_verb(self, request: HttpRequest, queryset: QuerySet[Rollout], verb: str, done: str) -> None:
        for rollout in queryset.order_by("pk"):
            try:
                moved = getattr(verbs, f"rollout_{verb}")(rollout=rollout, actor=request.user)
            except DomainError as error:
                self.message_user(request, f"rollout {rollout.pk}: {error.message}", messages.ERROR)
                continue
            if moved:
                self.message_user(request, ROLLOUT_VERB_DONE.format(rollout_id=rollout.pk, done=done), messages.SUCCESS)
            else:
                self.message_user(
                    request, ROLLOUT_VERB_RACED.format(rollout_id=rollout.pk, done=done), messages.WARNING
                )

    @admin.action(description="Start the selected draft rollouts", permissions=["operate"])
    def start_rollouts(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        self._run_verb(request, queryset, "start", "started")

    @admin.action(description="Pause the selected rollouts", permissions=["operate"])
    def pause_rollouts(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        self._run_verb(request, queryset, "pause", "paused")

    @admin.action(description="Resume the selected rollouts", permissions=["operate"])
    def resume_rollouts(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        self._run_verb(request, queryset, "resume", "resumed")

    @admin.action(description="Promote the selected rollouts (skip to the last stage)", permissions=["operate"])
    def promote_rollouts(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        self._run_verb(request, queryset, "promote", "promoted to the last stage")

    @admin.action(description="Abort the selected rollouts (roll back)", permissions=["operate"])
    def abort_rollouts(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        self._run_verb(request, queryset, "abort", "aborted")

    @admin.action(description="Retry the selected rollouts from the first stage", permissions=["operate"])
    def retry_rollouts(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        self._run_verb(request, queryset, "retry", "restarted from the first stage")

    @admin.action(description="Approve the next stage that needs approval", permissions=["operate"])
    def approve_next_stage(self, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        for rollout in queryset.order_by("pk"):
            stage = (
                rollout.stages.filter(requires_approval=True, approved_at__isnull=True, index__gt=rollout.stage_index)
                .order_by("index")
                .first()
            )
            if stage is None or rollout.state not in (RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED):
                self.message_user(request, NOTHING_TO_APPROVE.format(rollout_id=rollout.pk), messages.WARNING)
                continue
            if verbs.rollout_approve_stage(rollout=rollout, stage_index=stage.index, actor=request.user):
                self.message_user(
                    request, ROLLOUT_VERB_DONE.format(rollout_id=rollout.pk, done=f"stage {stage.index} approved")
                )
            else:
                self.message_user(
                    request,
                    ROLLOUT_VERB_RACED.format(rollout_id=rollout.pk, done=f"stage {stage.index} approved"),
                    messages.WARNING,
                )
