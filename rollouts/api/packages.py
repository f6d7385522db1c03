"""The packages API: packages, their versions and files (uploads), package assignments, and
what agents report per version. Thin over rollouts.packages (writes) and the models'
reads; the storage's own file listing is never exposed, only the files recorded here.

A file is uploaded as the raw request body (`application/octet-stream`), streamed to the
storage: `POST packages/{name}/versions/{version}/files/?os=linux&arch=amd64`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Prefetch, QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.api.permissions import RolePermission
from fleet.api.strict_input import JSONParser
from fleet.api.validation import StrictSerializer, validated
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from rollouts import packages as services
from rollouts.api.serializers import CONFIGURATION_NAME_REGEX, LabelSelectorSerializer, SelectorField
from rollouts.models import Package, PackageAssignment, PackageFile, PackageType, PackageVersion
from rollouts.package_files import PACKAGE_TOO_LARGE
from rollouts.package_statuses import package_status_summary

NAME_INVALID = "must not be empty, start with a space or contain '/'"
NO_BODY = "send the file as the request body (Content-Type: application/octet-stream)"


class PackageInputSerializer(StrictSerializer):
    name = serializers.RegexField(CONFIGURATION_NAME_REGEX, max_length=200, error_messages={"invalid": NAME_INVALID})
    type = serializers.ChoiceField(choices=PackageType.choices, default=PackageType.TOP_LEVEL)
    description = serializers.CharField(default="", allow_blank=True)


class PackageVersionInputSerializer(StrictSerializer):
    version = serializers.RegexField(CONFIGURATION_NAME_REGEX, max_length=200, error_messages={"invalid": NAME_INVALID})
    note = serializers.CharField(default="", allow_blank=True)


class AssignmentInputSerializer(StrictSerializer):
    name = serializers.RegexField(CONFIGURATION_NAME_REGEX, max_length=200, error_messages={"invalid": NAME_INVALID})
    package = serializers.CharField(max_length=200)
    version = serializers.CharField(max_length=200)
    selector = SelectorField(default=dict)
    priority = serializers.IntegerField(default=0, min_value=-(2**31), max_value=2**31 - 1)


class AssignmentUpdateSerializer(StrictSerializer):
    version = serializers.CharField(max_length=200, required=False)
    selector = SelectorField(required=False)
    priority = serializers.IntegerField(required=False, min_value=-(2**31), max_value=2**31 - 1)


class PackageStatusSerializer(serializers.Serializer):
    package = serializers.CharField()
    versions = serializers.DictField(
        child=serializers.DictField(child=serializers.IntegerField()),
        help_text="version -> agents installed, pending, downloading, installing, failed",
    )


PLATFORM_PARAMETERS = [
    OpenApiParameter("os", str, description="os.type the file is for; omitted with arch: every platform"),
    OpenApiParameter("arch", str, description="host.arch the file is for"),
]


class PackageFileSerializer(serializers.ModelSerializer):
    class Meta:
        model = PackageFile
        fields = ["id", "os", "arch", "size", "sha256", "signature", "key_id", "created_at"]
        read_only_fields = fields


class PackageVersionSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    files = PackageFileSerializer(many=True, read_only=True)

    class Meta:
        model = PackageVersion
        fields = ["version", "note", "created_by", "created_at", "files"]
        read_only_fields = fields


class PackageSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    versions = serializers.SerializerMethodField()

    class Meta:
        model = Package
        fields = ["name", "type", "description", "created_by", "created_at", "versions"]
        read_only_fields = fields

    def get_versions(self, package: Package) -> list[str]:
        return [version.version for version in package.versions.all()]


class AssignmentSerializer(serializers.ModelSerializer):
    package = serializers.CharField(source="package.name", read_only=True)
    version = serializers.CharField(source="version.version", read_only=True)
    selector = LabelSelectorSerializer(read_only=True)
    selector_string = serializers.SerializerMethodField()

    class Meta:
        model = PackageAssignment
        fields = ["name", "package", "version", "selector", "selector_string", "priority", "created_at", "updated_at"]
        read_only_fields = fields

    def get_selector_string(self, assignment: PackageAssignment) -> str:
        return parse_selector(assignment.selector).to_string()


def package_or_404(name: str) -> Package:
    return get_object_or_404(Package, name=name)


def version_or_404(name: str, version: str) -> PackageVersion:
    queryset = PackageVersion.objects.select_related("package").prefetch_related("files")
    return get_object_or_404(queryset, package__name=name, version=version)


def _packages() -> QuerySet[Package]:
    return Package.objects.prefetch_related(Prefetch("versions", PackageVersion.objects.order_by("-created_at", "-id")))


class PackagesAPIMixin:
    permission_classes = [RolePermission]
    parser_classes = [JSONParser]


class PackageListView(PackagesAPIMixin, generics.GenericAPIView):
    """Packages: list (viewer), create (operator)."""

    serializer_class = PackageSerializer

    def get_queryset(self) -> QuerySet[Package]:
        return _packages()

    @extend_schema(operation_id="packages_list", responses=PackageSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(PackageSerializer(page, many=True).data)

    @extend_schema(operation_id="packages_create", request=PackageInputSerializer, responses={201: PackageSerializer})
    def post(self, request: Request) -> Response:
        data = validated(PackageInputSerializer, request.data)
        package = services.package_create(actor=request.user, **data)
        return Response(PackageSerializer(_packages().get(pk=package.pk)).data, status=status.HTTP_201_CREATED)


class PackageDetailView(PackagesAPIMixin, APIView):
    @extend_schema(operation_id="packages_retrieve", responses=PackageSerializer)
    def get(self, request: Request, name: str) -> Response:
        return Response(PackageSerializer(get_object_or_404(_packages(), name=name)).data)


class PackageVersionListView(PackagesAPIMixin, generics.GenericAPIView):
    """A package's versions, newest first, with their files."""

    serializer_class = PackageVersionSerializer
    queryset = PackageVersion.objects.none()  # the schema's model; requests read the package's own

    @extend_schema(operation_id="package_versions_list", responses=PackageVersionSerializer(many=True))
    def get(self, request: Request, name: str) -> Response:
        package = package_or_404(name)
        queryset = package.versions.prefetch_related("files").select_related("created_by").order_by("-created_at")
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(PackageVersionSerializer(page, many=True).data)

    @extend_schema(
        operation_id="package_versions_create",
        request=PackageVersionInputSerializer,
        responses={201: PackageVersionSerializer},
    )
    def post(self, request: Request, name: str) -> Response:
        package = package_or_404(name)
        data = validated(PackageVersionInputSerializer, request.data)
        row = services.package_version_create(package=package, actor=request.user, **data)
        return Response(PackageVersionSerializer(version_or_404(name, row.version)).data, status=201)


class PackageVersionDetailView(PackagesAPIMixin, APIView):
    @extend_schema(operation_id="package_versions_retrieve", responses=PackageVersionSerializer)
    def get(self, request: Request, name: str, version: str) -> Response:
        return Response(PackageVersionSerializer(version_or_404(name, version)).data)


class PackageFileUploadView(PackagesAPIMixin, APIView):
    """POST the file's bytes as the body; `os` and `arch` query parameters name its platform
    (both omitted: for every platform). GET lists the version's files."""

    @extend_schema(operation_id="package_files_list", responses=PackageFileSerializer(many=True))
    def get(self, request: Request, name: str, version: str) -> Response:
        return Response(PackageFileSerializer(version_or_404(name, version).files.all(), many=True).data)

    @extend_schema(
        operation_id="package_files_upload",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=PLATFORM_PARAMETERS,
        responses={201: PackageFileSerializer},
    )
    def post(self, request: Request, name: str, version: str) -> Response:
        row = version_or_404(name, version)
        limit = settings.OPAMP_PACKAGE_MAX_BYTES
        declared = request.META.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > limit:
            # Refused before a byte is read; a body without a length is counted as it streams.
            raise DomainError(PACKAGE_TOO_LARGE.format(limit=limit), status=413)
        stream = request.stream  # the raw body; never parsed or read whole into memory
        if stream is None:
            raise DomainError(NO_BODY, field="file")
        file = services.package_file_upload(
            version=row,
            source=stream,
            os=request.query_params.get("os", ""),
            arch=request.query_params.get("arch", ""),
            actor=request.user,
        )
        return Response(PackageFileSerializer(file).data, status=status.HTTP_201_CREATED)


class PackageStatusView(PackagesAPIMixin, APIView):
    """Per version: how many agents report it installed, pending, downloading, installing, failed."""

    @extend_schema(operation_id="package_status", responses=PackageStatusSerializer)
    def get(self, request: Request, name: str) -> Response:
        package = package_or_404(name)
        return Response({"package": package.name, "versions": package_status_summary(package.name)})


def _assignments() -> QuerySet[PackageAssignment]:
    return PackageAssignment.objects.select_related("package", "version")


class AssignmentListView(PackagesAPIMixin, generics.GenericAPIView):
    serializer_class = AssignmentSerializer

    def get_queryset(self) -> QuerySet[PackageAssignment]:
        return _assignments()

    @extend_schema(operation_id="package_assignments_list", responses=AssignmentSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(AssignmentSerializer(page, many=True).data)

    @extend_schema(
        operation_id="package_assignments_create",
        request=AssignmentInputSerializer,
        responses={201: AssignmentSerializer},
    )
    def post(self, request: Request) -> Response:
        data: dict[str, Any] = validated(AssignmentInputSerializer, request.data)
        package = Package.objects.filter(name=data.pop("package")).first()
        if package is None:
            raise DomainError("no such package", field="package")
        assignment = services.package_assignment_create(package=package, actor=request.user, **data)
        return Response(AssignmentSerializer(_assignments().get(pk=assignment.pk)).data, status=201)


class AssignmentDetailView(PackagesAPIMixin, APIView):
    @extend_schema(operation_id="package_assignments_retrieve", responses=AssignmentSerializer)
    def get(self, request: Request, name: str) -> Response:
        return Response(AssignmentSerializer(get_object_or_404(_assignments(), name=name)).data)

    @extend_schema(
        operation_id="package_assignments_update", request=AssignmentUpdateSerializer, responses=AssignmentSerializer
    )
    def patch(self, request: Request, name: str) -> Response:
        assignment = get_object_or_404(_assignments(), name=name)
        data = validated(AssignmentUpdateSerializer, request.data)
        services.package_assignment_update(assignment=assignment, actor=request.user, **data)
        return Response(AssignmentSerializer(_assignments().get(pk=assignment.pk)).data)

    @extend_schema(operation_id="package_assignments_destroy", responses={204: None})
    def delete(self, request: Request, name: str) -> Response:
        services.package_assignment_delete(assignment=get_object_or_404(_assignments(), name=name), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
