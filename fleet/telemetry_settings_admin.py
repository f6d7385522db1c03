"""The admin of telemetry connection settings: every write through fleet.connection_settings
(checked, audited, the revision bumped), the documents edited as JSON. Readers without the
operator role see the entries with header values hidden (they may be credentials)."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from fleet.admin_base import RoleAdminMixin, ServiceErrorsAsMessagesMixin, pretty_json
from fleet.connection_settings import (
    SETTINGS_FIELDS,
    telemetry_settings_create,
    telemetry_settings_delete,
    telemetry_settings_list,
    telemetry_settings_update,
)
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from fleet.models import TelemetryConnectionSettings
from fleet.telemetry_settings import OWN_FIELDS, redacted

_JSON_FIELDS = (*OWN_FIELDS, "other_connections")
# What a reader without the operator role sees of an entry (header values hidden).
READER_FIELDS = [
    "name",
    "description",
    "selector_string",
    "priority",
    "own_metrics_shown",
    "own_traces_shown",
    "own_logs_shown",
    "other_connections_shown",
    "heartbeat_interval_seconds",
    "created_by",
    "created_at",
    "updated_at",
]
_DESTINATION_HELP = (
    'JSON, e.g. {"destination_endpoint": "https://otlp.example:4318/v1/metrics", '
    '"headers": {"Authorization": "Bearer ..."}, "tls": {"ca_pem": "...", "insecure_skip_verify": false}}; '
    "empty: not set"
)


class TelemetrySettingsForm(forms.ModelForm):
    selector = forms.CharField(required=False, strip=True, widget=forms.Textarea(attrs={"rows": 2, "cols": 80}))
    own_metrics = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 4}), help_text=_DESTINATION_HELP)
    own_traces = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 4}), help_text=_DESTINATION_HELP)
    own_logs = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 4}), help_text=_DESTINATION_HELP)
    other_connections = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 4}), help_text="JSON: connection name -> destination"
    )

    class Meta:
        model = TelemetryConnectionSettings
        fields = ["name", "description", "selector", "priority", *_JSON_FIELDS, "heartbeat_interval_seconds"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.initial["selector"] = parse_selector(self.instance.selector).to_string()
            for name in _JSON_FIELDS:
                value = getattr(self.instance, name)
                self.initial[name] = json.dumps(value, indent=2) if value else ""

    def clean_selector(self) -> dict[str, Any]:
        text = self.cleaned_data.get("selector") or ""
        try:
            return parse_selector(json.loads(text) if text.startswith("{") else text).to_dict()
        except json.JSONDecodeError as error:
            raise ValidationError(f"invalid JSON: {error}") from None
        except SelectorError as error:
            raise ValidationError(str(error)) from None

    def _json(self, name: str) -> Any:
        text = (self.cleaned_data.get(name) or "").strip()
        if not text:
            return {} if name == "other_connections" else None
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValidationError(f"invalid JSON: {error}") from None

    def clean_own_metrics(self) -> Any:
        return self._json("own_metrics")

    def clean_own_traces(self) -> Any:
        return self._json("own_traces")

    def clean_own_logs(self) -> Any:
        return self._json("own_logs")

    def clean_other_connections(self) -> Any:
        return self._json("other_connections")


@admin.register(TelemetryConnectionSettings)
class TelemetrySettingsAdmin(ServiceErrorsAsMessagesMixin, RoleAdminMixin, admin.ModelAdmin):
    form = TelemetrySettingsForm
    list_display = ["name", "priority", "selector_string", "fields_set", "heartbeat_interval_seconds"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_by", "created_at", "updated_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[TelemetryConnectionSettings]:
        return telemetry_settings_list().select_related("created_by")

    def get_fields(self, request: HttpRequest, obj: TelemetryConnectionSettings | None = None) -> Any:
        if obj is not None and not self.has_change_permission(request, obj):
            return READER_FIELDS
        return super().get_fields(request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj: TelemetryConnectionSettings | None = None) -> Any:
        if obj is not None and not self.has_change_permission(request, obj):
            return READER_FIELDS
        return self.readonly_fields

    def _shown(self, entry: TelemetryConnectionSettings, name: str) -> str:
        if name == "other_connections":
            return pretty_json({key: redacted(value) for key, value in (entry.other_connections or {}).items()})
        return pretty_json(redacted(getattr(entry, name)))

    @admin.display(description="own metrics")
    def own_metrics_shown(self, entry: TelemetryConnectionSettings) -> str:
        return self._shown(entry, "own_metrics")

    @admin.display(description="own traces")
    def own_traces_shown(self, entry: TelemetryConnectionSettings) -> str:
        return self._shown(entry, "own_traces")

    @admin.display(description="own logs")
    def own_logs_shown(self, entry: TelemetryConnectionSettings) -> str:
        return self._shown(entry, "own_logs")

    @admin.display(description="other connections")
    def other_connections_shown(self, entry: TelemetryConnectionSettings) -> str:
        return self._shown(entry, "other_connections")

    @admin.display(description="selector")
    def selector_string(self, entry: TelemetryConnectionSettings) -> str:
        return parse_selector(entry.selector).to_string() or "(every agent)"

    @admin.display(description="sets")
    def fields_set(self, entry: TelemetryConnectionSettings) -> str:
        names = [name for name in OWN_FIELDS if getattr(entry, name) is not None]
        names += [f"other: {name}" for name in entry.other_connections or {}]
        return ", ".join(names) or "—"

    def save_model(
        self, request: HttpRequest, obj: TelemetryConnectionSettings, form: TelemetrySettingsForm, change: bool
    ) -> None:
        values = {name: form.cleaned_data[name] for name in SETTINGS_FIELDS}
        if change:
            saved = telemetry_settings_update(entry=obj, actor=request.user, name=form.cleaned_data["name"], **values)
        else:
            saved = telemetry_settings_create(actor=request.user, name=form.cleaned_data["name"], **values)
        obj.__dict__.update(saved.__dict__)

    def delete_model(self, request: HttpRequest, obj: TelemetryConnectionSettings) -> None:
        telemetry_settings_delete(entry=obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[TelemetryConnectionSettings]) -> None:
        for entry in queryset:
            telemetry_settings_delete(entry=entry, actor=request.user)
