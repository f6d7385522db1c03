"""Admin for configurations and their versions.

Every write goes through `rollouts.services` (so it is validated, audited and re-resolves
the agents it affects); the forms only check input early, with the same parsers the
services use, so that problems show up as form errors. The role rules of the API apply
here too (`rollouts.api.roles`); the admin itself additionally requires staff status.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from fleet.admin import pretty_json
from rollouts import selectors
from rollouts.api.roles import can_read, can_write
from rollouts.api.serializers import CONFIGURATION_NAME_INVALID, CONFIGURATION_NAME_REGEX
from rollouts.config_files import ConfigValidationError, parse_config_files
from rollouts.errors import DomainError
from rollouts.label_selectors import SelectorError, parse_selector
from rollouts.models import AgentDesiredConfig, AuditEvent, Configuration, ConfigVersion
from rollouts.services import (
    config_limits,
    configuration_create,
    configuration_delete,
    configuration_publish,
    configuration_rollback,
    configuration_update,
)

# What a service may refuse after the form accepted the input (e.g. a name taken meanwhile).
SERVICE_ERRORS = (DomainError, ConfigValidationError, SelectorError)
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


def _pre(text: str) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", text)


class RoleAdminMixin:
    """Viewers (and staff) see, operators (and superusers) change; the admin site itself
    only lets staff in."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return can_read(request.user)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_read(request.user)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return can_write(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_write(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_write(request.user)


class ReadOnlyRoleAdminMixin(RoleAdminMixin):
    """Rows written only as a consequence of services; nobody edits them here."""

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ServiceErrorsAsMessagesMixin:
    """A refusal the form could not foresee is shown as a message on the same form.

    The admin runs the form view in a transaction, so nothing of the failed attempt stays.
    """

    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)  # type: ignore[misc]
        except SERVICE_ERRORS as error:
            self.message_user(request, str(error), messages.ERROR)  # type: ignore[attr-defined]
            return HttpResponseRedirect(request.get_full_path())


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


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["at", "actor", "action", "target_type", "target_id"]
    list_filter = ["action", "target_type", "actor"]
    search_fields = ["target_id", "actor__username"]
    date_hierarchy = "at"
    fields = ["at", "actor", "action", "target_type", "target_id", "details_display"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEvent]:
        return selectors.audit_list()

    @admin.display(description="details")
    def details_display(self, event: AuditEvent) -> str:
        return pretty_json(event.details)
