"""Routes of the signing API, mounted at /api/v1/ beside the fleet and configurations APIs."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from signing.api import views

router = SimpleRouter()
router.register("signing-keys", views.SigningKeyViewSet, basename="signing-key")
router.register("enrollment-tokens", views.EnrollmentTokenViewSet, basename="enrollment-token")
router.register("certificate-requests", views.CertificateRequestViewSet, basename="certificate-request")
router.register("certificates", views.CertificateViewSet, basename="certificate")

urlpatterns = [
    *router.urls,
    path("ca/", views.CertificateAuthorityView.as_view(), name="certificate-authority"),
    path("ca/crl/", views.CertificateRevocationListView.as_view(), name="certificate-revocation-list"),
]
