"""Admin for config versions: immutable; the add form publishes through
`configuration_publish`, the change page shows the files, the agents' status and the diff.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html_join

from fleet.admin_base import CreateOnlyRoleAdminMixin, ServiceErrorsAsMessagesMixin
from rollouts import selectors
from rollouts.admin.saved_rows import become
from rollouts.config_files import ConfigValidationError, parse_config_files
from rollouts.models import ConfigVersion
from rollouts.services import config_limits, configuration_publish

FILES_HELP = (
    'JSON: <code>{"collector.yaml": {"body": "receivers: ...", "content_type": "text/yaml"}}</code>. '
    "Content types: YAML, JSON or text/plain."
)
NOT_PUBLISHED = "The files are identical to the current version {number} of {name}; no new version was made."


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
class ConfigVersionAdmin(ServiceErrorsAsMessagesMixin, CreateOnlyRoleAdminMixin, admin.ModelAdmin):
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
        become(obj, version)
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
