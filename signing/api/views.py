"""The signing API: config-signing public keys, enrollment tokens, the certificate request
queue, issued certificates, the CA certificate and its CRL.

Each handler decodes its input with a serializer, makes one service or selector call, and
encodes the result; refusals are answered centrally by `fleet.api.exceptions`. Viewers
read, operators change; every change is audited by the service that makes it.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status, viewsets
from rest_framework.decorators import action
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from fleet.api.exceptions import error_body
from fleet.api.permissions import RolePermission
from fleet.api.strict_input import JSONParser
from fleet.api.validation import validated
from signing import selectors
from signing.api import filters
from signing.api import serializers as s
from signing.ca import LoadedCa
from signing.certificates import (
    ApprovalOutcome,
    certificate_request_approve,
    certificate_request_reject,
    certificate_revoke,
)
from signing.config_signing import public_key_pem
from signing.configured_ca import certificate_authority_load
from signing.crl import crl_pem
from signing.enrollment_tokens import enrollment_token_create, enrollment_token_revoke
from signing.errors import CA_NOT_CONFIGURED, REQUEST_NOT_PENDING, SigningError
from signing.models import CertificateRequest, EnrollmentToken, IssuedCertificate, SigningKey
from signing.signing_keys import signing_key_retire

CSR_NO_LONGER_PASSES = (
    "certificate request {pk} no longer passes the certificate policy and was rejected instead: {reason}"
)
CRL_FORMAT_UNKNOWN = "the CRL format must be der (the default) or pem"


class SigningAPIMixin:
    """The role rules of the configurations API, and JSON bodies only."""

    permission_classes = [RolePermission]
    parser_classes = [JSONParser]


# Signing keys


class SigningKeyViewSet(SigningAPIMixin, viewsets.GenericViewSet):
    """The public halves of the config-signing keys, active first. Private keys never leave
    their files; there is nothing private to show here."""

    serializer_class = s.SigningKeySerializer
    filterset_class = filters.SigningKeyFilter
    lookup_field = "key_id"
    lookup_value_regex = "[^/]+"
    ordering_fields = ["created_at", "retired_at"]
    ordering = ["-active", "-created_at"]

    def get_queryset(self) -> QuerySet[SigningKey]:
        return selectors.signing_key_list()

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(s.SigningKeySerializer(page, many=True).data)

    def retrieve(self, request: Request, key_id: str) -> Response:
        return Response(s.SigningKeySerializer(self.get_object()).data)

    @extend_schema(
        request=None,
        responses=s.SigningKeySerializer,
        description="Withdraw the key for good: signatures made with it are no longer accepted and it never "
        "signs again. Retiring a retired key changes nothing. The key that signs new versions is refused "
        '(409) unless the body says {"force": true}: every publish then fails until a new key is configured.',
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def retire(self, request: Request, key_id: str) -> Response:
        key = self.get_object()
        force = str(request.data.get("force", "")).lower() in ("true", "1")
        signing_key_retire(key=key, actor=request.user, force=force)
        return Response(s.SigningKeySerializer(key).data)

    @extend_schema(
        responses=s.TrustedKeySerializer(many=True),
        description="Every public key agents should trust: the registered keys that are not retired, plus "
        "those in OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR (minus any retired here).",
    )
    @action(detail=False, methods=["get"], filter_backends=[], pagination_class=None)
    def trusted(self, request: Request) -> Response:
        keys = [
            {"key_id": key_id, "algorithm": s.SIGNING_ALGORITHM, "public_key_pem": public_key_pem(key)}
            for key_id, key in sorted(selectors.trusted_public_keys().items())
        ]
        return Response(s.TrustedKeySerializer(keys, many=True).data)


# Enrollment tokens


class EnrollmentTokenViewSet(SigningAPIMixin, viewsets.GenericViewSet):
    """Enrollment tokens, newest first. Only a hash of each secret is stored: the secret is in
    the answer that creates the token and nowhere else, ever."""

    serializer_class = s.EnrollmentTokenSerializer
    filterset_class = filters.EnrollmentTokenFilter
    ordering_fields = ["created_at", "expires_at", "name"]
    ordering = ["-created_at", "-id"]

    def get_queryset(self) -> QuerySet[EnrollmentToken]:
        return selectors.enrollment_token_list()

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(s.EnrollmentTokenSerializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(s.EnrollmentTokenSerializer(self.get_object()).data)

    @extend_schema(
        request=s.EnrollmentTokenInputSerializer,
        responses={201: s.EnrollmentTokenCreatedSerializer},
        description="Create a token. The answer carries the secret agents enrol with: it is shown this once "
        "and cannot be retrieved again.",
    )
    def create(self, request: Request) -> Response:
        data = validated(s.EnrollmentTokenInputSerializer, request.data)
        token, secret = enrollment_token_create(actor=request.user, **data)
        token = self.get_queryset().get(pk=token.pk)
        return Response(
            s.EnrollmentTokenCreatedSerializer(token, context={"secret": secret}).data, status=status.HTTP_201_CREATED
        )

    @extend_schema(
        request=None,
        responses=s.EnrollmentTokenSerializer,
        description="Stop the token enrolling agents; agents already enrolled keep their credentials. "
        "Revoking a revoked token changes nothing.",
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def revoke(self, request: Request, pk: str) -> Response:
        token = self.get_object()
        enrollment_token_revoke(token=token, actor=request.user)
        return Response(s.EnrollmentTokenSerializer(token).data)


# Certificate requests


class CertificateRequestViewSet(SigningAPIMixin, viewsets.GenericViewSet):
    """Agents' certificate requests, newest first: the approval queue is `?state=pending`."""

    serializer_class = s.CertificateRequestDetailSerializer
    filterset_class = filters.CertificateRequestFilter
    ordering_fields = ["requested_at", "decided_at"]
    ordering = ["-requested_at", "-id"]

    def get_queryset(self) -> QuerySet[CertificateRequest]:
        return selectors.certificate_request_list()

    def _encode(self, item: CertificateRequest) -> Response:
        return Response(s.CertificateRequestDetailSerializer(self.get_queryset().get(pk=item.pk)).data)

    @extend_schema(responses=s.CertificateRequestSerializer(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(s.CertificateRequestSerializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(s.CertificateRequestDetailSerializer(self.get_object()).data)

    @staticmethod
    def _require_pending(item: CertificateRequest) -> None:
        if item.state != CertificateRequest.State.PENDING:
            raise SigningError(REQUEST_NOT_PENDING.format(pk=item.pk, state=item.state), status=409)

    @extend_schema(
        request=None,
        responses=s.CertificateRequestDetailSerializer,
        description="Check the CSR against the policy again and issue its certificate. A request that is not "
        "pending is a 409; so is one whose CSR no longer passes, which is rejected with the policy's reason.",
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def approve(self, request: Request, pk: str) -> Response:
        item = self.get_object()
        self._require_pending(item)
        outcome = certificate_request_approve(request=item, actor=request.user)
        if outcome is ApprovalOutcome.ISSUED:
            return self._encode(item)
        if outcome is ApprovalOutcome.NO_LONGER_PASSES:
            # The rejection stands: answered, not raised, so nothing rolls it back.
            detail = CSR_NO_LONGER_PASSES.format(pk=item.pk, reason=item.reason)
            return Response(error_body(detail, field="csr"), status=status.HTTP_409_CONFLICT)
        raise SigningError(REQUEST_NOT_PENDING.format(pk=item.pk, state=item.state), status=409)

    @extend_schema(
        request=s.RejectSerializer,
        responses=s.CertificateRequestDetailSerializer,
        description="Reject a pending request, with the reason. A request that is not pending is a 409.",
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def reject(self, request: Request, pk: str) -> Response:
        data = validated(s.RejectSerializer, request.data)
        item = self.get_object()
        self._require_pending(item)
        if not certificate_request_reject(request=item, actor=request.user, reason=data["reason"]):
            raise SigningError(REQUEST_NOT_PENDING.format(pk=item.pk, state=item.state), status=409)
        return self._encode(item)


# Certificates


class CertificateViewSet(SigningAPIMixin, viewsets.GenericViewSet):
    """Client certificates issued to agents, newest first."""

    serializer_class = s.CertificateDetailSerializer
    filterset_class = filters.CertificateFilter
    ordering_fields = ["issued_at", "not_after"]
    ordering = ["-issued_at", "-id"]

    def get_queryset(self) -> QuerySet[IssuedCertificate]:
        return selectors.issued_certificate_list()

    @extend_schema(responses=s.CertificateSerializer(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(s.CertificateSerializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(s.CertificateDetailSerializer(self.get_object()).data)

    @extend_schema(
        request=s.RevokeSerializer,
        responses=s.CertificateDetailSerializer,
        description="Revoke the certificate: it goes into the CRL and the agent's session is asked to re-check. "
        "Revocation is final; revoking again changes nothing (the first reason stays).",
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def revoke(self, request: Request, pk: str) -> Response:
        data = validated(s.RevokeSerializer, request.data)
        certificate = self.get_object()
        certificate_revoke(certificate=certificate, actor=request.user, reason=data["reason"])
        return Response(s.CertificateDetailSerializer(self.get_queryset().get(pk=certificate.pk)).data)


# The CA


def _configured_ca() -> LoadedCa:
    loaded = certificate_authority_load()
    if loaded is None:
        raise SigningError(CA_NOT_CONFIGURED, status=404)
    return loaded


class CertificateAuthorityView(SigningAPIMixin, generics.GenericAPIView):
    """The certificate agents' client certificates are issued under (never its key)."""

    serializer_class = s.CertificateAuthoritySerializer

    @extend_schema(
        responses={200: s.CertificateAuthoritySerializer, 404: OpenApiResponse(description=CA_NOT_CONFIGURED)}
    )
    def get(self, request: Request) -> Response:
        loaded = _configured_ca()
        cert = loaded.cert
        return Response(
            s.CertificateAuthoritySerializer(
                {
                    "subject": cert.subject.rfc4514_string(),
                    "fingerprint_sha256": loaded.fingerprint_sha256,
                    "not_before": cert.not_valid_before_utc,
                    "not_after": cert.not_valid_after_utc,
                    "certificate_pem": loaded.cert_pem,
                }
            ).data
        )


class CrlDerRenderer(BaseRenderer):
    media_type = "application/pkix-crl"
    format = "der"
    charset = None
    render_style = "binary"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> Any:
        return data


class CrlPemRenderer(CrlDerRenderer):
    media_type = "application/x-pem-file"
    format = "pem"


class CrlNegotiation(DefaultContentNegotiation):
    """`?format=` names a renderer; an unknown one is a clear 400 rather than DRF's bare 404."""

    def select_renderer(self, request: Request, renderers: list[BaseRenderer], format_suffix: str | None = None) -> Any:
        wanted = request.query_params.get(self.settings.URL_FORMAT_OVERRIDE)
        if wanted is not None and wanted not in {renderer.format for renderer in renderers}:
            raise SigningError(CRL_FORMAT_UNKNOWN, field="format")
        return super().select_renderer(request, renderers, format_suffix)


class CertificateRevocationListView(SigningAPIMixin, generics.GenericAPIView):
    """A CRL signed now by the configured CA, listing its revoked certificates not yet expired.

    DER (`application/pkix-crl`, RFC 5280) by default; PEM (`application/x-pem-file`) with
    `?format=pem` or `Accept: application/x-pem-file`. Errors are JSON.
    """

    renderer_classes = [CrlDerRenderer, CrlPemRenderer]
    content_negotiation_class = CrlNegotiation

    @extend_schema(
        parameters=[
            OpenApiParameter("format", OpenApiTypes.STR, enum=["der", "pem"], description="der (the default) or pem")
        ],
        responses={
            (200, CrlDerRenderer.media_type): OpenApiTypes.BINARY,
            (200, CrlPemRenderer.media_type): OpenApiTypes.STR,
            (404, "application/json"): OpenApiResponse(description=CA_NOT_CONFIGURED),
        },
    )
    def get(self, request: Request) -> Response:
        _configured_ca()
        pem = crl_pem()
        if request.accepted_renderer.format == CrlPemRenderer.format:
            return Response(pem)
        return Response(x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER))

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        if isinstance(response, Response) and not isinstance(response.data, bytes):
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response
