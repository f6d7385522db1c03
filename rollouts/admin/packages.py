"""Admin for packages, their versions and files, and package assignments.

Every write goes through `rollouts.packages` (validated, audited, the file streamed to the
packages storage, signed). Packages, versions and files are created here and never edited:
a version's bytes are what agents' hashes and signatures name.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from fleet.admin_base import CreateOnlyRoleAdminMixin, RoleAdminMixin, ServiceErrorsAsMessagesMixin
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from rollouts.admin.saved_rows import become
from rollouts.models import Package, PackageAssignment, PackageFile, PackageVersion
from rollouts.packages import (
    package_assignment_create,
    package_assignment_delete,
    package_assignment_update,
    package_create,
    package_file_upload,
    package_version_create,
)


@admin.register(Package)
class PackageAdmin(ServiceErrorsAsMessagesMixin, CreateOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["name", "type", "created_by", "created_at"]
    search_fields = ["name", "description"]
    fields = ["name", "type", "description"]

    def save_model(self, request: HttpRequest, obj: Package, form: forms.ModelForm, change: bool) -> None:
        fields = {name: form.cleaned_data[name] for name in ("name", "type", "description")}
        become(obj, package_create(actor=request.user, **fields))


class PackageFileForm(forms.ModelForm):
    file = forms.FileField(help_text="stored as uploaded; its SHA-256 and signature are computed on upload")

    class Meta:
        model = PackageFile
        fields = ["version", "os", "arch"]


@admin.register(PackageFile)
class PackageFileAdmin(ServiceErrorsAsMessagesMixin, CreateOnlyRoleAdminMixin, admin.ModelAdmin):
    form = PackageFileForm
    list_display = ["version", "os", "arch", "size", "sha256", "key_id", "created_at"]
    list_filter = ["os", "arch"]
    readonly_fields = ["size", "sha256", "key_id", "signature", "uploaded_by", "created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PackageFile]:
        return super().get_queryset(request).select_related("version__package")

    def get_fields(self, request: HttpRequest, obj: PackageFile | None = None) -> list[str]:
        if obj is None:
            return ["version", "os", "arch", "file"]
        return ["version", "os", "arch", *self.readonly_fields]

    def save_model(self, request: HttpRequest, obj: PackageFile, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        saved = package_file_upload(
            version=data["version"], source=data["file"], os=data["os"], arch=data["arch"], actor=request.user
        )
        become(obj, saved)


class PackageFileInline(admin.TabularInline):
    model = PackageFile
    fields = ["os", "arch", "size", "sha256", "key_id", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(PackageVersion)
class PackageVersionAdmin(ServiceErrorsAsMessagesMixin, CreateOnlyRoleAdminMixin, admin.ModelAdmin):
    list_display = ["package", "version", "created_by", "created_at"]
    list_filter = ["package"]
    fields = ["package", "version", "note"]
    inlines = [PackageFileInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PackageVersion]:
        return super().get_queryset(request).select_related("package", "created_by")

    def save_model(self, request: HttpRequest, obj: PackageVersion, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        saved = package_version_create(
            package=data["package"], version=data["version"], note=data["note"], actor=request.user
        )
        become(obj, saved)


class PackageAssignmentForm(forms.ModelForm):
    selector = forms.CharField(
        required=False,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="The short form, e.g. env=prod,tier in (edge,core), or the JSON form. Empty selects every agent.",
    )

    class Meta:
        model = PackageAssignment
        fields = ["name", "package", "version", "selector", "priority"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.initial["selector"] = parse_selector(self.instance.selector).to_string()

    def clean_selector(self) -> dict[str, Any]:
        text = self.cleaned_data.get("selector") or ""
        try:
            return parse_selector(json.loads(text) if text.startswith("{") else text).to_dict()
        except json.JSONDecodeError as error:
            raise ValidationError(f"invalid JSON: {error}") from None
        except SelectorError as error:
            raise ValidationError(str(error)) from None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        package, version = data.get("package"), data.get("version")
        if package is not None and version is not None and version.package_id != package.pk:
            raise ValidationError({"version": f"not a version of {package.name}"})
        return data


@admin.register(PackageAssignment)
class PackageAssignmentAdmin(ServiceErrorsAsMessagesMixin, RoleAdminMixin, admin.ModelAdmin):
    form = PackageAssignmentForm
    list_display = ["name", "package", "version", "priority", "selector_string"]
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PackageAssignment]:
        return super().get_queryset(request).select_related("package", "version")

    def get_readonly_fields(self, request: HttpRequest, obj: PackageAssignment | None = None) -> list[str]:
        return ["name", "package"] if obj is not None else []

    @admin.display(description="selector")
    def selector_string(self, assignment: PackageAssignment) -> str:
        return parse_selector(assignment.selector).to_string() or "(every agent)"

    def save_model(self, request: HttpRequest, obj: PackageAssignment, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            saved = package_assignment_update(
                assignment=obj,
                actor=request.user,
                version=data["version"].version,
                selector=data["selector"],
                priority=data["priority"],
            )
        else:
            saved = package_assignment_create(
                name=data["name"],
                package=data["package"],
                version=data["version"].version,
                selector=data["selector"],
                priority=data["priority"],
                actor=request.user,
            )
        become(obj, saved)

    def delete_model(self, request: HttpRequest, obj: PackageAssignment) -> None:
        package_assignment_delete(assignment=obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[PackageAssignment]) -> None:
        for assignment in queryset:
            package_assignment_delete(assignment=assignment, actor=request.user)
