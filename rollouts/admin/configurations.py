"""Admin for configurations: the form (selector in either form), the versions inline, and
the roll-back action. Every write goes through `rollouts.services`.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from fleet.admin_base import ReadOnlyRoleAdminMixin, RoleAdminMixin, ServiceErrorsAsMessagesMixin
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from fleet.roles import can_write
from rollouts import selectors
from rollouts.admin.saved_rows import become
from rollouts.api.serializers import CONFIGURATION_NAME_INVALID, CONFIGURATION_NAME_REGEX
from rollouts.models import Configuration, ConfigVersion
from rollouts.services import configuration_create, configuration_delete, configuration_rollback, configuration_update

SELECTOR_HELP = (
    "The short form, e.g. <code>env=prod,tier in (edge,core),!legacy</code>, or the JSON form "
    "<code>{&quot;matchLabels&quot;: {...}, &quot;matchExpressions&quot;: [...]}</code>. Empty selects every agent."
)


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


class ConfigVersionInline(ReadOnlyRoleAdminMixin, admin.TabularInline):
    model = ConfigVersion
    fk_name = "configuration"
    fields = ["number", "config_hash", "author", "created_at", "note", "rolled_back_from", "size_bytes"]
    readonly_fields = fields
    ordering = ["-number"]
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "versions (immutable; publish a new one to change the files)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ConfigVersion]:
        return super().get_queryset(request).select_related("author", "rolled_back_from", "configuration")


# Shown, never edited: the "Delivery" section of a configuration's page.
DELIVERY_FIELDS = ["current_version_display", "agent_count", "publish_link", "created_by", "created_at", "updated_at"]


@admin.register(Configuration)
class ConfigurationAdmin(ServiceErrorsAsMessagesMixin, RoleAdminMixin, admin.ModelAdmin):
    form = ConfigurationForm
    list_display = ["name", "priority", "selector_string", "current_version_display", "agent_count"]
    search_fields = ["name", "description"]
    readonly_fields = DELIVERY_FIELDS
    fieldsets = [
        (None, {"fields": ["name", "description", "selector", "priority"]}),
        ("Delivery", {"fields": DELIVERY_FIELDS}),
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
        become(obj, saved)

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
