"""Admin for rollouts: the add form (a draft of a configuration's or a package's version
through the services the API calls), the timeline inline, per-stage counts, a package
rollout's package statuses, and the verbs as actions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from fleet.admin_base import CreateOnlyRoleAdminMixin, ReadOnlyRoleAdminMixin, ServiceErrorsAsMessagesMixin
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from fleet.roles import can_write
from rollouts import selectors
from rollouts.admin.saved_rows import become
from rollouts.api import rollout_serializers
from rollouts.errors import NO_SUCH_VERSION
from rollouts.models import ROLLOUT_SUBJECT_RELATIONS, Rollout, RolloutEvent, RolloutState
from rollouts.package_statuses import rollout_package_statuses
from rollouts.packages import package_version_named
from rollouts.rollout_services import answers, creation, verbs

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
# The first column is the version; the others are package_statuses' counts.
PACKAGE_STATUS_COLUMNS = ("version", "installed", "installing", "downloading", "pending", "failed")
STAGES_NOT_A_LIST = "the stages must be a JSON list of objects"
STAGE_UNKNOWN_FIELD = "stage {index}: unknown field {name!r}; a stage has {known}"


class RolloutAddForm(forms.ModelForm):
    """Input for `rollout_create` (a configuration's) or `package_rollout_create` (a
    package's), the services the API calls: they apply the stage and gate rules themselves
    (their refusals come back as messages)."""

    candidate_version = forms.CharField(
        max_length=200,
        help_text="a configuration's version number to roll out, or the package's version "
        "(a package rolls out from the version its assignments give)",
    )
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
            "package",
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
        # The text given; the model field of that name (a configuration's version) gets the
        # version found, or nothing (the instance the form builds must not get the text).
        given = data.pop("candidate_version", None)
        configuration, package = data.get("configuration"), data.get("package")
        if (configuration is None) == (package is None):
            raise ValidationError(rollout_serializers.ONE_SUBJECT)
        if given is None:
            return data
        if package is not None:
            try:
                data["candidate_package_version"] = package_version_named(package, given, field="candidate_version")
            except DomainError as error:
                self.add_error("candidate_version", error.message)
            return data
        version = None
        if given.isdigit():
            version = selectors.version_list(configuration).filter(number=int(given)).first()
        if version is None:
            self.add_error("candidate_version", NO_SUCH_VERSION.format(name=configuration.name, number=given))
        else:
            # The model field of the same name: the instance the form builds gets the version.
            data["candidate_version"] = version
        return data


class RolloutEventInline(ReadOnlyRoleAdminMixin, admin.TabularInline):
    model = RolloutEvent
    fields = ["at", "kind", "from_state", "to_state", "stage_index", "actor", "message", "counts_display"]
    readonly_fields = fields
    ordering = ["at", "id"]
    extra = 0
    can_delete = False
    verbose_name_plural = "timeline"

    def get_queryset(self, request: HttpRequest) -> QuerySet[RolloutEvent]:
        return super().get_queryset(request).select_related("actor")

    @admin.display(description="counts")
    def counts_display(self, event: RolloutEvent) -> str:
        if not event.counts:
            return "—"
        return format_html_join(", ", "{}: {}", sorted(event.counts.items()))


def _verb_action(verb: str, done: str, description: str) -> Callable[..., None]:
    """An admin action that runs `rollout_<verb>` on each selected rollout."""

    @admin.action(description=description, permissions=["operate"])
    def action(admin_: RolloutAdmin, request: HttpRequest, queryset: QuerySet[Rollout]) -> None:
        admin_._run_verb(request, queryset, verb, done)

    return action


@admin.register(Rollout)
class RolloutAdmin(ServiceErrorsAsMessagesMixin, CreateOnlyRoleAdminMixin, admin.ModelAdmin):
    """Rollouts are read here and moved by the verbs of `rollout_services.verbs` (the
    actions); nothing is edited through a form. The add form only creates a draft through
    `rollout_create` or `package_rollout_create`."""

    list_display = ["id", "subject", "versions", "state", "stage", "stage_count", "created_at"]
    list_display_links = ["id"]
    list_filter = ["state", "configuration", "package"]
    search_fields = ["configuration__name", "package__name", "note"]
    date_hierarchy = "created_at"
    configuration_fields = ["configuration", "stable_version", "candidate_version"]
    package_fields = ["package", "stable_package_version", "candidate_package_version"]
    detail_fields = [
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
            .select_related(*ROLLOUT_SUBJECT_RELATIONS, "created_by")
            .annotate(stage_total=Count("stages"))
        )

    # Roles: anyone who may read sees rollouts; operators create drafts and run the verbs.

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
        subject = self.package_fields if obj.is_package else self.configuration_fields
        fieldsets: list[Any] = [
            (None, {"fields": [*subject, *self.detail_fields]}),
            ("Stages", {"fields": ["stages_display"]}),
        ]
        if obj.is_package:
            fieldsets.append(("Package statuses", {"fields": ["package_statuses_display"]}))
        if obj.state in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
            fieldsets.append(("Rollback", {"fields": ["rollback_display"]}))
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Rollout | None = None) -> list[str]:
        if obj is None:
            return []
        return [
            *self.configuration_fields,
            *self.package_fields,
            *self.detail_fields,
            "stages_display",
            "rollback_display",
            "package_statuses_display",
        ]

    def get_inlines(self, request: HttpRequest, obj: Rollout | None = None) -> list[Any]:
        return [] if obj is None else self.inlines

    @admin.display(description="subject")
    def subject(self, rollout: Rollout) -> str:
        return f"package {rollout.subject_name}" if rollout.is_package else rollout.subject_name

    @admin.display(description="stable → candidate")
    def versions(self, rollout: Rollout) -> str:
        return f"{rollout.stable_label} → {rollout.candidate_label}"

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
                    stage.size_display,
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

    @admin.display(description="of the agents given the candidate")
    def package_statuses_display(self, rollout: Rollout) -> str:
        if not rollout.is_package:
            return "—"
        header = format_html_join("", "<th>{}</th>", ((name,) for name in PACKAGE_STATUS_COLUMNS))
        body = format_html_join(
            "",
            "<tr>" + "<td>{}</td>" * len(PACKAGE_STATUS_COLUMNS) + "</tr>",
            (
                (version, *(counts[name] for name in PACKAGE_STATUS_COLUMNS[1:]))
                for version, counts in rollout_package_statuses(rollout).items()
            ),
        )
        return format_html(
            '<table id="package-statuses"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>', header, body
        )

    def save_model(self, request: HttpRequest, obj: Rollout, form: RolloutAddForm, change: bool) -> None:
        data = form.cleaned_data
        policy = {
            "stages": data["stages"],
            "actor": request.user,
            "max_failure_rate": data["max_failure_rate"],
            "apply_timeout_seconds": data["apply_timeout_seconds"],
            "min_reporting": data["min_reporting"],
            "auto_rollback": data["auto_rollback"],
            "salt": data["salt"] or None,
            "note": data["note"],
        }
        if data["package"] is not None:
            rollout = creation.package_rollout_create(
                package=data["package"], candidate=data["candidate_package_version"], **policy
            )
        else:
            rollout = creation.rollout_create(
                configuration=data["configuration"], candidate=data["candidate_version"], **policy
            )
        become(obj, rollout)

    # Actions: each runs the verb per rollout, so one refusal does not stop the rest.

    def _run_verb(self, request: HttpRequest, queryset: QuerySet[Rollout], verb: str, done: str) -> None:
        for rollout in queryset.order_by("pk"):
            try:
                moved = getattr(verbs, f"rollout_{verb}")(rollout=rollout, actor=request.user)
            except DomainError as error:
                self.message_user(request, f"rollout {rollout.pk}: {error.message}", messages.ERROR)
                continue
            self._report_verb(request, rollout, moved, done, messages.SUCCESS)

    def _report_verb(self, request: HttpRequest, rollout: Rollout, moved: bool, done: str, done_level: int) -> None:
        """What a verb did to one rollout, or that another request moved it first."""
        if moved:
            self.message_user(request, ROLLOUT_VERB_DONE.format(rollout_id=rollout.pk, done=done), done_level)
        else:
            self.message_user(request, ROLLOUT_VERB_RACED.format(rollout_id=rollout.pk, done=done), messages.WARNING)

    start_rollouts = _verb_action("start", "started", "Start the selected draft rollouts")
    pause_rollouts = _verb_action("pause", "paused", "Pause the selected rollouts")
    resume_rollouts = _verb_action("resume", "resumed", "Resume the selected rollouts")
    promote_rollouts = _verb_action(
        "promote", "promoted to the last stage", "Promote the selected rollouts (skip to the last stage)"
    )
    abort_rollouts = _verb_action("abort", "aborted", "Abort the selected rollouts (roll back)")
    retry_rollouts = _verb_action(
        "retry", "restarted from the first stage", "Retry the selected rollouts from the first stage"
    )

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
            approved = verbs.rollout_approve_stage(rollout=rollout, stage_index=stage.index, actor=request.user)
            self._report_verb(request, rollout, approved, f"stage {stage.index} approved", messages.INFO)
